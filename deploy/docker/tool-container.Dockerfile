# syntax=docker/dockerfile:1
# Base image of tool containers (docs/tool-developers.md): the core package with `altan serve-tools`, no service's
# extra. Build from the repository root:
#   docker build -f deploy/docker/tool-container.Dockerfile -t altan-tool-container:0.1.0 .
# and extend it with a module of tools (deploy/docker/weather-tool.Dockerfile):
#   FROM altan-tool-container:0.1.0
#   COPY mytools.py /app/mytools.py
#   CMD ["altan", "serve-tools", "/app/mytools.py", "--port", "7000"]

FROM python:3.11-slim AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# The core package lives in libs/ alone (tests/unit/test_service_dependencies.py keeps serve-tools importable with it).
COPY pyproject.toml ./
COPY libs ./libs
RUN pip install --no-cache-dir "."

FROM python:3.11-slim
COPY --from=builder /opt/venv /opt/venv
# Containers bind every interface; nothing is written at run time (bytecode was compiled in the builder), so the
# root filesystem can be read-only.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    ALTAN_BIND_HOST=0.0.0.0
WORKDIR /app
# The uid the Helm chart runs tool containers as (runAsUser 10001); writable at run time: /tmp.
USER 10001:10001
