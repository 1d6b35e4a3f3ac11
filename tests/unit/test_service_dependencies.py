"""Each service's image installs only its own extra (pyproject.toml): prove each service imports with just that.

A service is imported in a fresh interpreter where the packages of the *other* extras cannot be imported. A new
import of, say, httpx in the agent service fails here before it fails in the agent's image.
"""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Import names of each extra's packages (and of what they bring along that our code could import directly).
MODULES = {
    "fastapi": ["fastapi"],
    "starlette": ["starlette"],
    "uvicorn": ["uvicorn"],
    "sse-starlette": ["sse_starlette"],
    "httpx": ["httpx", "httpcore"],
    "jsonschema": ["jsonschema", "referencing", "jsonschema_specifications"],
    "google-re2": ["re2"],
    "tenacity": ["tenacity"],
    "authlib": ["authlib"],
    # Google's packages share the "google" namespace with protobuf (a core dependency): blocked by their own names.
    "google-cloud-secret-manager": ["google.cloud.secretmanager", "google.cloud.secretmanager_v1"],
    "google-cloud-logging": ["google.cloud.logging", "google.cloud.logging_v2"],
    "google-crc32c": ["google_crc32c"],
    "mcp": ["mcp"],
    "kubernetes": ["kubernetes"],
}

BLOCKER = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in BLOCKED):
            raise ImportError(f"{name} is not in this service's extra")
sys.meta_path.insert(0, Block())
import services.%s.__main__
"""


def _name(requirement: str) -> str:
    return re.split(r"[\[<>=!~;\s]", requirement, maxsplit=1)[0].strip().lower()


def _extra(name: str) -> set[str]:
    """The extra's distributions and everything they require: the image installs those too (the MCP client, for
    one, imports starlette)."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    found: set[str] = set()
    todo = [_name(req) for req in extras[name]]
    while todo:
        dist = todo.pop()
        if dist in found:
            continue
        found.add(dist)
        try:
            requires = importlib.metadata.requires(dist) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        todo += [_name(req) for req in requires if "extra ==" not in req]
    return found


@pytest.mark.parametrize("service", ["gateway", "agent", "tool", "integrator"])
def test_service_imports_with_only_its_extra(service: str) -> None:
    allowed = _extra(service)
    blocked = sorted({m for dist, mods in MODULES.items() if dist not in allowed for m in mods})
    assert blocked, "nothing to block: the check would prove nothing"
    code = f"BLOCKED = {set(blocked)!r}\n" + BLOCKER % service
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]


def test_the_integrator_loads_google_clients_only_when_an_install_chooses_google() -> None:
    """Local installs do not pay for importing Google's client libraries (about 0.2 s and 13 MB)."""
    code = "BLOCKED = {'google.cloud', 'google.api_core', 'google_crc32c'}\n" + BLOCKER % "integrator"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]


def test_blocker_catches_a_forbidden_import() -> None:
    code = "BLOCKED = {'fastapi', 'starlette'}\n" + BLOCKER % "gateway"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode != 0 and "not in this service's extra" in result.stderr


def test_a_tool_container_needs_only_the_core() -> None:
    """A tool container's image installs `altan` without extras: `altan serve-tools` must import with no extra."""
    blocked = sorted({m for mods in MODULES.values() for m in mods})
    code = f"BLOCKED = {set(blocked)!r}\n" + BLOCKER.replace("import services.%s.__main__", "%s")
    code = code % "import altan.cli, altan.sdk.container\naltan.cli._parser().parse_args(['serve-tools', 'x.py'])"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
