"""The ``altan`` command as an operator uses it: tokens, and ``altan up`` supervising its processes."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

import jwt
import pytest

from altan.delegation import (
    PUBLIC_KEYS_SETTING,
    SIGNING_KEY_SETTING,
    generate_key_pair,
    load_public_keys,
    load_signing_key,
)
from tests.e2e.stack import JWT_SECRET, free_port, start_stack

ROOT = Path(__file__).resolve().parents[2]


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


def test_up_restarts_a_service_that_dies_and_keeps_running(tmp_path: Path) -> None:
    """The old behaviour ended the stack here; now the service comes back (tests/e2e/test_supervision.py)."""
    stack = start_stack(data_dir=tmp_path, egress_allow="", redis_url=None)
    try:
        children = stack.service_pids()
        assert set(children) == {"gateway", "agent", "tool", "integrator"}
        os.kill(children["tool"], signal.SIGKILL)
        deadline = time.monotonic() + 60
        while "altan: tool restarted (pid " not in stack.logs():
            assert stack.process.poll() is None, stack.logs()[-3000:]
            assert time.monotonic() < deadline, stack.logs()[-3000:]
            time.sleep(0.05)
        now = stack.service_pids()
        assert now["tool"] != children["tool"]
        assert {name: pid for name, pid in now.items() if name != "tool"} == {
            name: pid for name, pid in children.items() if name != "tool"
        }
    finally:
        assert stack.stop() == 0, stack.logs()[-3000:]


def _altan(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "altan.cli", *args], env=env, capture_output=True, text=True, timeout=60
    )


def _clean_env(tmp_path: Path, **settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALTAN_") and k != "REDIS_URL"}
    return env | {"ALTAN_JWT_SECRET": JWT_SECRET, "ALTAN_DATA_DIR": str(tmp_path / "data")} | settings


def test_up_refuses_a_service_that_refuses_its_configuration(tmp_path: Path) -> None:
    """A setting only a service checks (the egress allow-list): the service says why, the stack exits 2."""
    env = _clean_env(tmp_path, ALTAN_EGRESS_ALLOW="not a destination")
    for name in ("AGENT", "TOOL", "INTEGRATOR"):
        env[f"ALTAN_{name}_PORT"] = str(free_port())
    result = _altan("up", "--http-port", str(free_port()), "--grpc-port", str(free_port()), env=env)
    output = result.stdout + result.stderr
    assert result.returncode == 2
    assert "invalid configuration: ALTAN_EGRESS_ALLOW" in output
    assert "Traceback" not in output


BAD_SETTINGS = {
    "port-not-a-number": (
        {"ALTAN_HTTP_PORT": "abc"},
        (),
        "ALTAN_HTTP_PORT: Input should be a valid integer, unable to parse string as an integer",
    ),
    "flag-out-of-range": (
        {},
        ("--grpc-port", "70000"),
        "--grpc-port / ALTAN_GRPC_PORT: Input should be less than or equal to 65535",
    ),
    "leeway": (
        {"ALTAN_JWT_LEEWAY_SECONDS": "600"},
        (),
        "ALTAN_JWT_LEEWAY_SECONDS: Input should be less than or equal to 60",
    ),
    "short-jwt-secret": (
        {"ALTAN_JWT_SECRET": "c2VjcmV0LXZhbHVl"},
        (),
        "ALTAN_JWT_SECRET: must be at least 32 bytes (e.g. `openssl rand -base64 32`)",
    ),
    "bad-master-key": (
        {"ALTAN_MASTER_KEY": "c2VjcmV0LXZhbHVl"},
        (),
        "ALTAN_MASTER_KEY: must be base64 of exactly 32 bytes",
    ),
    "data-dir-not-a-directory": (
        {"ALTAN_DATA_DIR": "/dev/null", "ALTAN_JWT_SECRET": ""},
        (),
        "ALTAN_DATA_DIR: /dev/null is not a directory",
    ),
    "ports-given-twice": (
        {"ALTAN_AGENT_PORT": "50999", "ALTAN_TOOL_PORT": "50999"},
        (),
        "ALTAN_TOOL_PORT: 50999 is also the port of the agent service",
    ),
}


@pytest.mark.parametrize(("settings", "flags", "line"), list(BAD_SETTINGS.values()), ids=list(BAD_SETTINGS))
def test_up_refuses_bad_settings_in_one_line_before_starting_anything(
    tmp_path: Path, settings: dict[str, str], flags: tuple[str, ...], line: str
) -> None:
    result = _altan("up", *flags, env=_clean_env(tmp_path, **settings))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"altan: invalid configuration: {line}"]
    assert result.stdout == ""
    assert "c2VjcmV0LXZhbHVl" not in result.stderr


@pytest.mark.parametrize(
    ("settings", "line"),
    [
        (
            {"ALTAN_JWT_SECRET": "c2VjcmV0LXZhbHVl"},
            "ALTAN_JWT_SECRET: must be at least 32 bytes (e.g. `openssl rand -base64 32`)",
        ),
        ({"ALTAN_DATA_DIR": "/dev/null", "ALTAN_JWT_SECRET": ""}, "ALTAN_DATA_DIR: /dev/null is not a directory"),
    ],
)
def test_token_refuses_bad_settings_in_one_line(tmp_path: Path, settings: dict[str, str], line: str) -> None:
    result = _altan("token", "--tenant", "acme", env=_clean_env(tmp_path, **settings))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"altan: invalid configuration: {line}"]
    assert "c2VjcmV0LXZhbHVl" not in result.stderr


def test_up_refuses_a_data_dir_it_cannot_write(tmp_path: Path) -> None:
    """With a configured JWT secret, the data directory still holds the generated master key."""
    if os.geteuid() == 0:  # root ignores directory modes, but not /sys
        unwritable = Path("/sys")
    else:
        unwritable = tmp_path / "read-only"
        unwritable.mkdir(mode=0o500)
    result = _altan("up", env=_clean_env(tmp_path, ALTAN_DATA_DIR=str(unwritable)))
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith(f"altan: invalid configuration: ALTAN_DATA_DIR: {unwritable} is not writable (")


def test_up_help_shows_every_flags_default_and_variable(tmp_path: Path) -> None:
    # A bad value in the environment does not break --help: values are read when the stack starts.
    result = _altan("up", "--help", env=_clean_env(tmp_path, ALTAN_HTTP_PORT="abc"))
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    for flag, default, variable in [
        ("--http-port", "8080", "ALTAN_HTTP_PORT"),
        ("--grpc-port", "50051", "ALTAN_GRPC_PORT"),
        ("--startup-timeout", "60", "ALTAN_STARTUP_TIMEOUT_SECONDS"),
        ("--stop-timeout", "15", "ALTAN_STOP_TIMEOUT_SECONDS"),
    ]:
        assert re.search(rf"{flag} \S+ [^(]*\(default: {default}; environment: {variable}\)", text), flag


def test_version_is_the_package_version(tmp_path: Path) -> None:
    result = _altan("--version", env=_clean_env(tmp_path))
    assert result.returncode == 0
    assert result.stdout.strip() == f"altan {version('altan')}"


def _environ(pid: int) -> dict[str, str]:
    entries = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(e.decode().partition("=")[::2] for e in entries if e)


def test_up_generates_the_delegation_key_pair_and_gives_the_private_key_to_the_agent_only(tmp_path: Path) -> None:
    data = tmp_path / "data"
    stack = start_stack(data_dir=data, egress_allow="", redis_url=None, delegation_keys=False)
    try:
        private, public = data / "delegation-signing-key.pem", data / "delegation-public-keys.pem"
        assert oct(private.stat().st_mode & 0o777) == "0o600"
        assert list(load_public_keys(public)) == [load_signing_key(private).kid]
        seen = {name: _environ(pid) for name, pid in stack.service_pids().items()}
        assert seen["agent"][SIGNING_KEY_SETTING] == str(private)
        for name in ("agent", "tool", "integrator"):
            assert seen[name][PUBLIC_KEYS_SETTING] == str(public), name
        for name in ("tool", "integrator", "gateway"):
            assert SIGNING_KEY_SETTING not in seen[name], name
        assert PUBLIC_KEYS_SETTING not in seen["gateway"]
        assert "-----BEGIN" not in stack.logs()
    finally:
        assert stack.stop() == 0, stack.logs()[-3000:]
    # The next start keeps the pair (tasks queued before it keep being resumed with delegations the services accept).
    kid = load_signing_key(private).kid
    again = start_stack(data_dir=data, egress_allow="", redis_url=None, delegation_keys=False)
    try:
        assert load_signing_key(private).kid == kid
    finally:
        assert again.stop() == 0, again.logs()[-3000:]


@pytest.mark.parametrize(
    ("command", "who"),
    [
        (("-m", "services.tool"), "tool service"),
        (("-m", "services.integrator"), "integrator service"),
        (("-m", "services.gateway"), "gateway"),
        (("-m", "altan.cli", "serve-tools", "examples/weather.py"), "tool container"),
    ],
)
def test_a_verifier_given_the_private_key_refuses_to_start(tmp_path: Path, command: tuple[str, ...], who: str) -> None:
    private, public = generate_key_pair(tmp_path / "keys")
    env = _clean_env(tmp_path, **{SIGNING_KEY_SETTING: str(private), PUBLIC_KEYS_SETTING: str(public)})
    for name in ("AGENT", "TOOL", "INTEGRATOR", "HTTP", "GRPC"):
        env[f"ALTAN_{name}_PORT"] = str(free_port())
    if "serve-tools" in command:
        command = (*command, "--port", str(free_port()))
    result = subprocess.run([sys.executable, *command], env=env, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 2, result.stdout + result.stderr
    prefix = "altan: " if "altan.cli" in command else ""
    assert result.stderr.splitlines() == [
        f"{prefix}invalid configuration: {SIGNING_KEY_SETTING}: only the agent signs delegations; the {who} must not "
        f"hold the private key (it verifies with {PUBLIC_KEYS_SETTING})"
    ]
