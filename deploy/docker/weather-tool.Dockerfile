# syntax=docker/dockerfile:1
# The weather example (examples/weather.py) as a tool container, on the base image. Build from the repository root,
# after the base:
#   docker build -f deploy/docker/tool-container.Dockerfile -t altan-tool-container:0.1.0 .
#   docker build -f deploy/docker/weather-tool.Dockerfile -t altan-weather-tool:0.1.0 .
# Deployed by the chart's ci/tool-containers-values.yaml (toolContainers: name weather, port 7000).

FROM altan-tool-container:0.1.0
COPY examples/weather.py /app/weather.py
# The base's user, said again so that the image states what it runs as.
USER 10001:10001
EXPOSE 7000
CMD ["altan", "serve-tools", "/app/weather.py", "--port", "7000"]
