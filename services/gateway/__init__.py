"""Public gateway: REST and gRPC in front of the services."""
