"""The four Dockerfiles (no docker engine here): multi-stage, a venv built by pip in the builder and copied into a
python:3.11-slim final stage, a fixed non-root uid, bind addresses for a container, and the service's entry point."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from .manifests import CHART, REPO, SERVICES

PORTS = {"gateway": ("httpPort", "grpcPort"), "agent": ("port",), "tool": ("port",), "integrator": ("port",)}


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", "\n".join(ln for ln in text.splitlines() if not ln.lstrip().startswith("#")))
    out = []
    for line in joined.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), " ".join(rest.split())))
    return out


@pytest.mark.parametrize("service", SERVICES)
def test_dockerfile(service: str) -> None:
    path = REPO / "deploy" / "docker" / f"{service}.Dockerfile"
    steps = instructions(path.read_text())
    stages = [args for word, args in steps if word == "FROM"]
    assert stages == ["python:3.11-slim AS builder", "python:3.11-slim"]
    final = steps[max(i for i, (w, _) in enumerate(steps) if w == "FROM") :]
    builder = steps[: len(steps) - len(final)]

    assert ("RUN", f'pip install --no-cache-dir ".[{service}]"') in builder  # only this service's extra
    assert any(w == "RUN" and "python -m venv /opt/venv" in a for w, a in builder)
    for word, args in builder:
        if word == "COPY":
            *sources, _ = args.split()
            for source in sources:
                assert (REPO / source).exists(), source

    assert ("COPY", "--from=builder /opt/venv /opt/venv") in final
    assert not any(w == "RUN" and "pip" in a for w, a in final), "nothing is installed in the final stage"
    users = [a for w, a in final if w == "USER"]
    assert users and users[-1] in {"10001", "10001:10001"}
    env = " ".join(a for w, a in final if w == "ENV")
    assert "ALTAN_BIND_HOST=0.0.0.0" in env
    assert "PATH=/opt/venv/bin:$PATH" in env
    if service == "gateway":
        assert "ALTAN_HTTP_HOST=0.0.0.0" in env
    if service == "integrator":
        assert "ALTAN_DATA_DIR=/var/lib/altan" in env

    (entrypoint,) = [a for w, a in final if w == "ENTRYPOINT"]
    assert json.loads(entrypoint) == ["python", "-m", f"services.{service}"]
    assert (REPO / "services" / service / "__init__.py").is_file()

    values = yaml.safe_load((CHART / "values.yaml").read_text())[service]
    (exposed,) = [a for w, a in final if w == "EXPOSE"]
    assert sorted(map(int, exposed.split())) == sorted(values[p] for p in PORTS[service])


def test_tool_container_base_has_the_core_package_alone() -> None:
    """The base of tool containers: multi-stage like the services', the core package without any extra, uid 10001,
    and no command of its own (the developer's image names its module)."""
    steps = instructions((REPO / "deploy" / "docker" / "tool-container.Dockerfile").read_text())
    assert [a for w, a in steps if w == "FROM"] == ["python:3.11-slim AS builder", "python:3.11-slim"]
    final = steps[max(i for i, (w, _) in enumerate(steps) if w == "FROM") :]
    builder = steps[: len(steps) - len(final)]
    assert ("RUN", 'pip install --no-cache-dir "."') in builder  # no extra: serve-tools needs the core alone
    assert [a for w, a in builder if w == "COPY"] == ["pyproject.toml ./", "libs ./libs"]
    assert ("COPY", "--from=builder /opt/venv /opt/venv") in final
    assert not any(w == "RUN" for w, _ in final), "nothing runs in the final stage"
    assert [a for w, a in final if w == "USER"][-1] == "10001:10001"
    env = " ".join(a for w, a in final if w == "ENV")
    assert "ALTAN_BIND_HOST=0.0.0.0" in env and "PYTHONDONTWRITEBYTECODE=1" in env
    assert not [w for w, _ in final if w in ("CMD", "ENTRYPOINT")]


def test_weather_example_image_serves_the_example_on_the_charts_port() -> None:
    steps = instructions((REPO / "deploy" / "docker" / "weather-tool.Dockerfile").read_text())
    assert [a for w, a in steps if w == "FROM"] == ["altan-tool-container:0.1.0"]
    assert ("COPY", "examples/weather.py /app/weather.py") in steps
    assert (REPO / "examples" / "weather.py").is_file()
    assert "!examples/weather.py" in (REPO / ".dockerignore").read_text().splitlines()
    (command,) = [json.loads(a) for w, a in steps if w == "CMD"]
    assert command[:3] == ["altan", "serve-tools", "/app/weather.py"]
    assert not [w for w, _ in steps if w == "RUN"], "nothing installed on top of the base"
    assert [a for w, a in steps if w == "USER"] == ["10001:10001"]
    scenario = yaml.safe_load((CHART / "ci" / "tool-containers-values.yaml").read_text())
    (weather,) = [tc for tc in scenario["toolContainers"] if tc["name"] == "weather"]
    assert command[3:] == ["--port", str(weather["port"])]
    (exposed,) = [a for w, a in steps if w == "EXPOSE"]
    assert exposed == str(weather["port"])
