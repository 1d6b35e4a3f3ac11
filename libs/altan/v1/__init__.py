"""Generated protobuf and gRPC code of proto/altan/v1 (do not edit; run `make proto`)."""
