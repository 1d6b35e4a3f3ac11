"""Agent Service: agents, tasks, structured plans."""
