"""The OpenAPI document describes the API: schemathesis, driven by /openapi.json, finds nothing with every check.

schemathesis runs from its own virtualenv (``make test`` installs .venv-schemathesis) against the real stack, with a
fixed seed and a bounded number of examples, through all its phases (examples, coverage, fuzzing, stateful). The only
configuration is tests/e2e/schemathesis.toml, which says per operation which rules a JSON Schema cannot state.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path

import httpx
import pytest

from tests.e2e.stack import Stack

ROOT = Path(__file__).resolve().parents[2]
SCHEMATHESIS = ROOT / ".venv-schemathesis" / "bin" / "st"
CONFIG = Path(__file__).with_name("schemathesis.toml")


def test_the_document_is_not_a_sketch(stack: Stack) -> None:
    """Request bodies are typed, every error status is documented with the one error shape, and there is no 422."""
    document = httpx.get(f"{stack.base_url}/openapi.json", timeout=10).json()
    schemas = document["components"]["schemas"]
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            where = f"{method.upper()} {path}"
            assert "422" not in operation["responses"], where
            if path == "/v1/oauth2/callback":  # the browser coming back from the provider: the state is the proof
                assert operation["security"] == [] and "401" not in operation["responses"], where
            if path.startswith("/v1/") and path != "/v1/oauth2/callback":
                assert operation["security"] == [{"bearer": []}], where
            if path.startswith("/v1/"):
                for status in ("400", "429", "503") if path == "/v1/oauth2/callback" else ("400", "401", "429", "503"):
                    error = operation["responses"][status]["content"]["application/json"]["schema"]
                    assert error == {"$ref": "#/components/schemas/ErrorBody"}, where
            body = operation.get("requestBody")
            if body is not None:
                ref = body["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]
                schema = schemas[ref]
                assert schema.get("properties") or schema.get("oneOf"), where  # never a bare object
    agent_spec = schemas[next(name for name in schemas if name.startswith("AgentSpec"))]
    assert agent_spec["additionalProperties"] is False and agent_spec["required"] == ["name"]
    assert "HTTPValidationError" not in schemas


def test_schemathesis_with_all_checks_finds_nothing(stack: Stack, tenant: str, tmp_path: Path) -> None:
    if not SCHEMATHESIS.exists():
        pytest.fail(f"{SCHEMATHESIS} is missing: `make test` installs it")
    token = stack.token(tenant)
    command = [
        str(SCHEMATHESIS),
        "--config-file",
        str(CONFIG),
        "run",
        f"{stack.base_url}/openapi.json",
        "--checks",
        "all",
        "--header",
        f"Authorization: Bearer {token}",
        "--max-examples",
        "20",
        "--seed",
        str(uuid.UUID(int=0).int + 7),
        "--workers",
        "1",
        "--request-timeout",
        "15",
        "--generation-database",
        "none",
        "--no-color",
        "--continue-on-failure",
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ALTAN_", "SCHEMATHESIS_"))}
    before = {route: stack.logs().count(f'"message": "POST {route} 201"') for route in ("/v1/agents", "/v1/tools")}
    run = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    report = run.stdout[run.stdout.find("FAILURES") :] if "FAILURES" in run.stdout else run.stdout[-12000:]
    report = "\n".join(line if len(line) < 400 else line[:400] + " [...]" for line in report.splitlines())
    assert run.returncode == 0, report[:20000] + run.stderr[-4000:]
    # The run reached the API's logic as this tenant, not only its 401s: it created resources (which its stateful
    # phase may have deleted again, so the gateway's request log counts them).
    created = {route: stack.logs().count(f'"message": "POST {route} 201"') - before[route] for route in before}
    assert all(created.values()), f"schemathesis created nothing on some routes: {created}"
