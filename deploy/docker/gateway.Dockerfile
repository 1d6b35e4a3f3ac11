# syntax=docker/dockerfile:1
# Image of the public gateway (REST and public gRPC). Build from the repository root:
#   docker build -f deploy/docker/gateway.Dockerfile -t altan-gateway .

FROM python:3.11-slim AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# Only what the package needs (the rest is in .dockerignore), so unrelated changes keep the layer cache.
COPY pyproject.toml ./
COPY libs ./libs
COPY services ./services
RUN pip install --no-cache-dir ".[gateway]"

FROM python:3.11-slim
COPY --from=builder /opt/venv /opt/venv
# Servers bind every interface in a container (the default, 127.0.0.1, suits a developer's machine). Bytecode was
# compiled by pip in the builder; nothing is written at run time, so the root filesystem can be read-only.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    ALTAN_HTTP_HOST=0.0.0.0 \
    ALTAN_BIND_HOST=0.0.0.0
# A fixed non-root uid, the one the Helm chart runs as (runAsUser 10001); writable at run time: /tmp.
USER 10001:10001
EXPOSE 8080 50051
ENTRYPOINT ["python", "-m", "services.gateway"]
