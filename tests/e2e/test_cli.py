"""The ``altan`` command as an operator uses it: tokens, and ``altan up`` supervising its processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import jwt
import pytest

from tests.e2e.stack import JWT_SECRET, free_port, start_stack


def test_token_prints_a_verifiable_development_token(tmp_path: Path) -> None:
    env = {**os.environ, "ALTAN_JWT_SECRET": JWT_SECRET, "ALTAN_DATA_DIR": str(tmp_path)}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "altan.cli",
            "token",
            "--tenant",
            "acme",
            "--sub",
            "bob",
            "--role",
            "member",
            "--ttl",
            "60",
        ],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    claims = jwt.decode(out, JWT_SECRET, algorithms=["HS256"], audience="altan", issuer="altan-dev")
    assert claims["tenant_id"] == "acme" and claims["sub"] == "bob" and claims["role"] == "member"
    assert claims["exp"] - claims["iat"] == 60


def test_token_without_a_secret_uses_the_generated_development_secret(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALTAN_")} | {"ALTAN_DATA_DIR": str(tmp_path)}
    command = [sys.executable, "-m", "altan.cli", "token", "--tenant", "acme"]
    first = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout.strip()
    secret = (tmp_path / "jwt.secret").read_text().strip()
    assert jwt.decode(first, secret, algorithms=["HS256"], audience="altan")["tenant_id"] == "acme"
    assert oct((tmp_path / "jwt.secret").stat().st_mode & 0o777) == "0o600"


def test_up_exits_nonzero_when_a_service_dies(tmp_path: Path) -> None:
    stack = start_stack(data_dir=tmp_path, egress_allow="", redis_url=None)
    children = stack.service_pids()
    assert set(children) == {"gateway", "agent", "tool", "integrator"}
    os.kill(children["tool"], signal.SIGKILL)
    code = stack.process.wait(timeout=60)
    stack.reader.join(10)
    assert code != 0
    assert "tool exited" in stack.logs()
    for pid in children.values():  # the others were stopped too
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
    assert stack.process.stdout is not None
    stack.process.stdout.close()


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("ALTAN_JWT_LEEWAY_SECONDS", "600", "invalid configuration: ALTAN_JWT_LEEWAY_SECONDS: "),
        ("ALTAN_EGRESS_ALLOW", "not a destination", "invalid configuration: ALTAN_EGRESS_ALLOW"),
    ],
)
def test_up_refuses_bad_configuration(tmp_path: Path, variable: str, value: str, message: str) -> None:
    env = {**os.environ, "ALTAN_JWT_SECRET": JWT_SECRET, "ALTAN_DATA_DIR": str(tmp_path), variable: value}
    command = [sys.executable, "-m", "altan.cli", "up", "--http-port", str(free_port()),
               "--grpc-port", str(free_port()), "--startup-timeout", "30"]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "invalid configuration" in output and message in output
    assert "Traceback" not in output
