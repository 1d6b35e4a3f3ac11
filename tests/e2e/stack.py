"""Starts the real stack (``altan up``: gateway + three services as separate processes) for end-to-end tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import jwt
import redis

from altan.delegation import PUBLIC_KEYS_SETTING, SIGNING_KEY_SETTING, generate_key_pair

JWT_SECRET = "e2e-development-secret-that-is-long-enough-for-hs256-hs384-and-hs512!"
# The key pair of task delegations of this test session: the agent signs with the private key, the services and the
# tool containers the tests start verify with the public one (removed when the session ends).
_KEYS = tempfile.TemporaryDirectory(prefix="altan-e2e-delegation-")
DELEGATION_SIGNING_KEY, DELEGATION_PUBLIC_KEYS = generate_key_pair(Path(_KEYS.name))

# Every tenant of this test session carries this marker, so that at the end the session removes exactly its own
# keys from a Redis that other sessions (other engineers, CI jobs) share.
SESSION_MARKER = f"e2e{uuid.uuid4().hex[:10]}"


def new_tenant() -> str:
    """A fresh tenant of this session: tests never see each other's data, and its keys can be removed."""
    return f"t-{SESSION_MARKER}-{uuid.uuid4().hex[:12]}"


def session_keys(client: redis.Redis) -> list[str]:
    """This session's keys: those of tenants carrying the marker (the tenant is the key's second part)."""
    found = client.scan_iter(match=f"altan:*{SESSION_MARKER}*", count=1000)
    return [key for key in (k.decode() for k in found) if SESSION_MARKER in key.split(":", 2)[1]]


def remove_session_keys(url: str) -> list[str]:
    """Delete this session's keys (SCAN + DEL, never another session's); returns what a new SCAN still finds."""
    client = redis.Redis.from_url(url, socket_timeout=10)
    try:
        keys = session_keys(client)
        for start in range(0, len(keys), 500):
            client.delete(*keys[start : start + 500])
        return session_keys(client)
    finally:
        client.close()


def _accepted_tenant(tenant: object) -> bool:
    # What the services accept as a tenant (decisions.md): a test may send others on purpose; they write nothing.
    return isinstance(tenant, str) and 0 < len(tenant) <= 128 and ":" not in tenant


def service_pids(parent: int) -> dict[str, int]:
    """The ``python -m services.<name>`` children of process ``parent``, by service name."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == parent and b"-m" in cmdline:
            found[cmdline[cmdline.index(b"-m") + 1].decode().removeprefix("services.")] = int(entry.name)
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Stack:
    process: subprocess.Popen[str]
    http_port: int
    grpc_port: int
    mode: str
    internal_ports: dict[str, int]
    # What the services were started with (another replica's), but the agent's private key (DELEGATION_SIGNING_KEY):
    # a tool or integrator replica given it would refuse to start.
    env: dict[str, str] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)
    ready: threading.Event = field(default_factory=threading.Event)
    reader: threading.Thread = field(init=False)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def token(self, tenant: str, role: str = "admin", sub: str = "alice", **overrides: Any) -> str:
        now = int(time.time())
        claims: dict[str, Any] = {
            "tenant_id": tenant,
            "sub": sub,
            "role": role,
            "aud": "altan",
            "iss": "altan-dev",
            "iat": now,
            "exp": now + 600,
        }
        claims.update(overrides)
        claims = {k: v for k, v in claims.items() if v is not None}
        tenant_id = claims.get("tenant_id")
        if self.mode == "redis" and _accepted_tenant(tenant_id) and SESSION_MARKER not in str(tenant_id):
            raise AssertionError(
                f"tenant {tenant_id!r} would leave keys in Redis: use the tenant fixture (or new_tenant()) or a name "
                "derived from it, which carries the session marker"
            )
        return jwt.encode(claims, JWT_SECRET, algorithm="HS256")

    def client(self, tenant: str, role: str = "admin", **overrides: Any) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.token(tenant, role, **overrides)}"}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=30, trust_env=False)

    def service_pids(self) -> dict[str, int]:
        """The service processes ``altan up`` started, by service name."""
        return service_pids(self.process.pid)

    def logs(self) -> str:
        return "".join(self.lines)

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)
            if "altan is up" in line:
                self.ready.set()
        self.ready.set()

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=30)
        self.reader.join(10)
        if self.process.stdout is not None:
            self.process.stdout.close()
        return code


def start_stack(
    *,
    data_dir: Path,
    egress_allow: str,
    redis_url: str | None,
    startup_timeout: float | None = None,
    wait_ready: bool = True,
    extra_env: dict[str, str] | None = None,
    tls: bool = False,
    delegation_keys: bool = True,
) -> Stack:
    """``altan up`` on free ports; returns once it says it is up (unless ``wait_ready`` is false). With the session's
    delegation key pair, or (``delegation_keys`` false) the one ``altan up`` generates in the data directory."""
    http_port, grpc_port = free_port(), free_port()
    internal = {name: free_port() for name in ("agent", "tool", "integrator")}
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALTAN_") and k != "REDIS_URL"}
    env.update(
        ALTAN_JWT_SECRET=JWT_SECRET,
        ALTAN_DATA_DIR=str(data_dir),
        ALTAN_EGRESS_ALLOW=egress_allow,
        ALTAN_AGENT_PORT=str(internal["agent"]),
        ALTAN_TOOL_PORT=str(internal["tool"]),
        ALTAN_INTEGRATOR_PORT=str(internal["integrator"]),
        ALTAN_MAX_BODY_BYTES=str(64 * 1024),
        # Small size limits, so that tests reach them with small requests (tests/e2e/test_limits.py).
        ALTAN_MAX_OUTPUT_BYTES=str(256 * 1024),
        ALTAN_MAX_EXPANSION_BYTES=str(128 * 1024),
        ALTAN_MAX_TASK_BYTES=str(1024 * 1024),
        ALTAN_CALL_DEADLINE_SECONDS="10",
        ALTAN_LOG_LEVEL="DEBUG",
        ALTAN_LLM_DEADLINE_SECONDS="10",
        # A task queue of this stack's own (stacks of every session share one Redis), removed with the session's keys.
        ALTAN_TASK_QUEUE=f"altan:{SESSION_MARKER}-q{uuid.uuid4().hex[:8]}:agent:work",
    )
    if delegation_keys:
        env.update({SIGNING_KEY_SETTING: str(DELEGATION_SIGNING_KEY), PUBLIC_KEYS_SETTING: str(DELEGATION_PUBLIC_KEYS)})
    env.update(extra_env or {})
    if redis_url:
        env["REDIS_URL"] = redis_url
    command = [sys.executable, "-m", "altan.cli", "up", "--http-port", str(http_port), "--grpc-port", str(grpc_port)]
    if startup_timeout is not None:
        command += ["--startup-timeout", str(startup_timeout)]
    if tls:
        command.append("--tls")
    process = subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    replica_env = {k: v for k, v in env.items() if k != SIGNING_KEY_SETTING}
    stack = Stack(process, http_port, grpc_port, "redis" if redis_url else "embedded", internal, replica_env)
    stack.reader = threading.Thread(target=stack._read, daemon=True)
    stack.reader.start()
    if not wait_ready:
        return stack
    if not stack.ready.wait(90) or process.poll() is not None:
        process.kill()
        raise RuntimeError("stack did not start:\n" + stack.logs())
    return stack
