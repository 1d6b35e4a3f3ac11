"""A stack that fails clearly: a taken port, an unreachable Redis and bad settings each say what is wrong in one
line (never a traceback, never a silent half-working stack), and the stack recovers by itself where it can."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.e2e.stack import JWT_SECRET, free_port, start_stack


@contextmanager
def held_port() -> Iterator[int]:
    """A port another server listens on, with SO_REUSEPORT as grpc servers set it by default: a server that
    binds with SO_REUSEPORT too would silently share it."""
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield int(holder.getsockname()[1])


def service_env(data_dir: Path, **settings: str) -> dict[str, str]:
    """The environment of one service started on its own, on free ports unless ``settings`` say otherwise."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALTAN_") and k != "REDIS_URL"}
    env.update(
        ALTAN_JWT_SECRET=JWT_SECRET,
        ALTAN_DATA_DIR=str(data_dir),
        **{f"ALTAN_{name}_PORT": str(free_port()) for name in ("HTTP", "GRPC", "AGENT", "TOOL", "INTEGRATOR")},
    )
    env.update(settings)
    return env


def run_service(name: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", f"services.{name}"], env=env, capture_output=True, text=True, timeout=60
    )


# --- taken ports ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("service", "setting", "who"),
    [
        ("agent", "ALTAN_AGENT_PORT", "agent service"),
        ("tool", "ALTAN_TOOL_PORT", "tool service"),
        ("integrator", "ALTAN_INTEGRATOR_PORT", "integrator service"),
        ("gateway", "ALTAN_HTTP_PORT", "gateway's REST server"),
        ("gateway", "ALTAN_GRPC_PORT", "gateway's public gRPC server"),
    ],
)
def test_a_service_whose_port_is_taken_says_so_in_one_line(
    tmp_path: Path, service: str, setting: str, who: str
) -> None:
    with held_port() as port:
        result = run_service(service, service_env(tmp_path, **{setting: str(port)}))
    assert result.returncode == 1, result.stderr
    assert result.stderr.splitlines() == [
        f"the {who} cannot listen on 127.0.0.1:{port}: address already in use ({setting})"
    ]


# --- bad settings -----------------------------------------------------------------------------------------------

SECRET_VALUE = "c2VjcmV0LXZhbHVl"  # base64, but of 12 bytes: a bad master key, and a JWT secret that is too short


@pytest.mark.parametrize(
    ("service", "settings", "lines"),
    [
        (
            "agent",
            {"ALTAN_AGENT_PORT": "abc"},
            ["ALTAN_AGENT_PORT: Input should be a valid integer, unable to parse string as an integer"],
        ),
        (
            "integrator",
            {"ALTAN_MASTER_KEY": SECRET_VALUE, "ALTAN_JWT_SECRET": SECRET_VALUE},
            [
                "ALTAN_JWT_SECRET: must be at least 32 bytes (e.g. `openssl rand -base64 32`)",
                "ALTAN_MASTER_KEY: must be base64 of exactly 32 bytes",
            ],
        ),
        ("integrator", {"ALTAN_DATA_DIR": "/dev/null"}, ["ALTAN_DATA_DIR: /dev/null is not a directory"]),
    ],
    ids=["port-not-a-number", "secrets", "data-dir-not-a-directory"],
)
def test_bad_settings_stop_a_service_with_one_line_each(
    tmp_path: Path, service: str, settings: dict[str, str], lines: list[str]
) -> None:
    result = run_service(service, service_env(tmp_path, **settings))
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [f"invalid configuration: {line}" for line in lines]
    assert SECRET_VALUE not in result.stdout + result.stderr


def run_up(env: dict[str, str], *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "altan.cli", "up", *flags], env=env, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize(
    ("setting", "who", "named"),
    [
        ("ALTAN_AGENT_PORT", "agent service", "ALTAN_AGENT_PORT"),
        ("ALTAN_TOOL_PORT", "tool service", "ALTAN_TOOL_PORT"),
        ("ALTAN_INTEGRATOR_PORT", "integrator service", "ALTAN_INTEGRATOR_PORT"),
        ("ALTAN_HTTP_PORT", "gateway's REST server", "--http-port / ALTAN_HTTP_PORT"),
        ("ALTAN_GRPC_PORT", "gateway's public gRPC server", "--grpc-port / ALTAN_GRPC_PORT"),
    ],
)
def test_up_names_the_port_that_is_taken_and_starts_nothing(tmp_path: Path, setting: str, who: str, named: str) -> None:
    with held_port() as port:
        result = run_up(service_env(tmp_path, **{setting: str(port)}))
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"altan: the {who} cannot listen on 127.0.0.1:{port}: address already in use ({named})"
    ]
    assert result.stdout == ""


def test_a_second_stack_on_the_same_ports_is_refused_and_the_first_keeps_serving(tmp_path: Path) -> None:
    first = start_stack(data_dir=tmp_path / "first", egress_allow="", redis_url=None)
    try:
        same_ports = {f"ALTAN_{name.upper()}_PORT": str(port) for name, port in first.internal_ports.items()}
        result = run_up(
            service_env(tmp_path / "second", **same_ports),
            "--http-port", str(first.http_port), "--grpc-port", str(first.grpc_port),
        )  # fmt: skip
        assert result.returncode == 1
        assert result.stderr.splitlines() == [
            f"altan: the agent service cannot listen on 127.0.0.1:{first.internal_ports['agent']}: "
            "address already in use (ALTAN_AGENT_PORT)"
        ]
        assert httpx.get(f"{first.base_url}/readyz", timeout=10, trust_env=False).status_code == 200
    finally:
        assert first.stop() == 0
