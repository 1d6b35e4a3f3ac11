"""A stack that fails clearly: a taken port, an unreachable Redis and bad settings each say what is wrong in one
line (never a traceback, never a silent half-working stack), and the stack recovers by itself where it can."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import httpx
import pytest

from altan.v1 import agent_pb2, agent_pb2_grpc, tool_pb2, tool_pb2_grpc
from tests.e2e.stack import JWT_SECRET, Stack, free_port, start_stack
from tests.redis_server import RedisServer


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


# --- an unreachable Redis ---------------------------------------------------------------------------------------


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.1)


def readyz(stack: Stack) -> httpx.Response:
    return httpx.get(f"{stack.base_url}/readyz", timeout=10, trust_env=False)


# Every kind of request that needs the state of a service (a built-in tool read from code does not).
REQUESTS: list[tuple[str, str, dict[str, object] | None]] = [
    ("GET", "/v1/agents", None),
    ("POST", "/v1/agents", {"name": "a", "tools": ["json_extract"]}),
    ("GET", "/v1/agents/agt_x", None),
    ("PATCH", "/v1/agents/agt_x", {"name": "b"}),
    ("DELETE", "/v1/agents/agt_x", None),
    ("GET", "/v1/tools", None),
    ("POST", "/v1/tools", {"tool_id": "t", "name": "t", "endpoint": "https://example.com", "method": "GET"}),
    ("GET", "/v1/tools/t", None),
    ("DELETE", "/v1/tools/t", None),
    ("POST", "/v1/tools/json_extract/invoke", {"arguments": {"data": {"k": 1}, "path": "k"}}),
    ("PUT", "/v1/credentials/c", {"type": "api_key", "value": "v"}),
    ("GET", "/v1/credentials", None),
    ("DELETE", "/v1/credentials/c", None),
    ("POST", "/v1/agents/agt_x/tasks", {"input": {"plan": []}}),
    ("GET", "/v1/tasks/tsk_x", None),
    ("POST", "/v1/tasks/tsk_x/cancel", None),
    ("GET", "/v1/tasks/tsk_x/events", None),
    ("GET", "/v1/audit", None),
]


def test_an_unreachable_redis_is_503_with_retry_after_and_the_stack_recovers(
    tmp_path: Path, redis_server: RedisServer, tenant: str
) -> None:
    stack = start_stack(data_dir=tmp_path / "data", egress_allow="", redis_url=redis_server.url)
    try:
        with stack.client(tenant) as api:
            created = api.post("/v1/agents", json={"name": "before", "tools": ["json_extract"]})
            assert created.status_code == 201, created.text

            redis_server.stop()
            # Each service notices at its next health probe (cached for a second): wait until all three have.
            everyone = "not ready: agent, tool, integrator not serving"
            wait_until(
                lambda: readyz(stack).json().get("error", {}).get("message") == everyone,
                "/readyz says the three services are not ready",
                30,
            )
            assert readyz(stack).json()["error"] == {
                "code": "UNAVAILABLE",
                "message": everyone,
            }
            for method, path, body in REQUESTS:
                answer = api.request(method, path, json=body)
                where = f"{method} {path}: {answer.status_code} {answer.text}"
                assert answer.status_code == 503, where
                assert answer.json()["error"]["code"] == "UNAVAILABLE", where
                assert int(answer.headers["Retry-After"]) >= 1, where

            metadata = (("authorization", f"Bearer {stack.token(tenant)}"),)
            with grpc.insecure_channel(f"127.0.0.1:{stack.grpc_port}") as channel:
                calls = [
                    lambda: agent_pb2_grpc.AgentServiceStub(channel).ListAgents(
                        agent_pb2.ListAgentsRequest(), metadata=metadata, timeout=10
                    ),
                    lambda: tool_pb2_grpc.ToolServiceStub(channel).ListTools(
                        tool_pb2.ListToolsRequest(), metadata=metadata, timeout=10
                    ),
                ]
                for call in calls:
                    with pytest.raises(grpc.RpcError) as caught:
                        call()
                    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
                    assert int(dict(caught.value.trailing_metadata())["retry-after"]) >= 1

            redis_server.start()  # empty: it kept nothing
            wait_until(lambda: readyz(stack).status_code == 200, "the stack is ready again")
            again = api.post("/v1/agents", json={"name": "after", "tools": ["json_extract"]})
            assert again.status_code == 201, again.text
            assert api.get(f"/v1/agents/{again.json()['id']}").json()["name"] == "after"
            plan = {"plan": [{"id": "s1", "tool": "json_extract", "arguments": {"data": {"k": 1}, "path": "k"}}]}
            task = api.post(f"/v1/agents/{again.json()['id']}/tasks", json={"input": plan})
            assert task.status_code == 202, task.text
            events = api.get(f"/v1/tasks/{task.json()['task_id']}/events").text
            assert "task.succeeded" in events
        assert "Traceback" not in stack.logs()
    finally:
        assert stack.stop() == 0, stack.logs()[-3000:]


def test_a_stack_started_while_redis_is_down_keeps_running_and_becomes_ready_when_it_is_up(
    tmp_path: Path, tenant: str
) -> None:
    redis_server = RedisServer(tmp_path)  # not started yet
    stack = start_stack(
        data_dir=tmp_path / "data", egress_allow="", redis_url=redis_server.url, startup_timeout=15, wait_ready=False
    )
    try:
        waiting = (
            "altan: not ready after 15 s: agent, tool, integrator not serving "
            "(is the Redis at REDIS_URL reachable?); waiting for it"
        )
        wait_until(lambda: waiting in stack.logs(), "altan up says what it waits for", timeout=60)
        assert stack.process.poll() is None and not stack.ready.is_set()
        with stack.client(tenant) as api:
            answer = api.get("/v1/agents")
            assert answer.status_code == 503 and "Retry-After" in answer.headers, answer.text
            redis_server.start()
            assert stack.ready.wait(30), stack.logs()[-3000:]  # "altan is up"
            assert api.get("/v1/agents").json() == {"agents": []}
    finally:
        try:
            assert stack.stop() == 0, stack.logs()[-3000:]
        finally:
            redis_server.stop()
