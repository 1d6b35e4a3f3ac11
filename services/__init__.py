"""The Altan services: agent, tool, integrator and the public gateway, each runnable with ``python -m``."""
