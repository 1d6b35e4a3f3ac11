"""The public contract in code: one pydantic model per resource, and its conversions to and from the protos.

Each module holds one resource (agents, tools, credentials, tasks, audit): the models that validate what a tenant
writes, whichever port it came through (the gateway validates a REST body with a model before it builds the proto;
the owning service rebuilds the same model from the proto, so a public gRPC call meets exactly the same rules), the
models that describe what the API answers (the OpenAPI document is generated from both), and the functions that
turn a stored document into a proto and a proto into the REST JSON. Nothing here imports grpc.
"""
