"""Integrator Engine: credentials, tool calls with retries and deadlines, audit."""
