"""Altan: shared core of the agent, tool and integrator services and the public gateway.

Submodules are imported explicitly (``from altan.auth import TokenVerifier``) so that a service pays only
for what it uses; the generated protobuf code lives in :mod:`altan.v1`.
"""
