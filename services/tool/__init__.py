"""Tool Service: the tool registry and executor, behind the egress guard."""
