"""Fixtures of the end-to-end suite: the real stack, run twice (embedded state and Redis), and a fake third party."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from tests.e2e.fake_llms import INSTALL_KEY, Llms
from tests.e2e.fake_third_party import FakeThirdParty, start_fake_third_party
from tests.e2e.stack import Stack, free_port, new_tenant, remove_session_keys, start_stack
from tests.fakes.mcp_server import start_process as start_mcp_server
from tests.fakes.mcp_server import stop_process as stop_mcp_server
from tests.fakes.oauth2 import FakeOAuth2Provider, start_fake_oauth2_provider
from tests.redis_server import RedisServer

MCP_TOKEN = "mcp-e2e-token-7f3a9c"


def _reachable(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """REDIS_URL if set, else the server on 127.0.0.1:6379, else a redis-server of our own on a free port."""
    url = os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0"
    if _reachable(url):
        yield url
        return
    if shutil.which("redis-server") is None:
        pytest.fail("no Redis: set REDIS_URL, run one on 127.0.0.1:6379, or put redis-server on PATH")
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server.url
    server.stop()


@pytest.fixture(scope="session")
def third_party() -> Iterator[FakeThirdParty]:
    fake = start_fake_third_party()
    yield fake
    fake.server.shutdown()
    fake.server.server_close()


@pytest.fixture(scope="session")
def oauth2_provider() -> Iterator[FakeOAuth2Provider]:
    fake = start_fake_oauth2_provider()
    yield fake
    fake.server.shutdown()
    fake.server.server_close()


@dataclass(frozen=True)
class McpServers:
    """The reference MCP server (tests/fakes/mcp_server.py) twice: open, and requiring ``Bearer <token>``."""

    port: int
    locked_port: int
    token: str = MCP_TOKEN


@pytest.fixture(scope="session")
def mcp_servers() -> Iterator[McpServers]:
    open_server, port = start_mcp_server()
    locked_server, locked_port = start_mcp_server(token=MCP_TOKEN)
    yield McpServers(port, locked_port)
    stop_mcp_server(open_server)
    stop_mcp_server(locked_server)


@pytest.fixture(scope="session")
def closed_port() -> int:
    """An allowed egress destination where nothing listens: connection refused, every time."""
    return free_port()


@pytest.fixture(scope="session")
def llms() -> Iterator[Llms]:
    """The fake LLM APIs (OpenAI and Anthropic wire formats), shared by the session; each test scripts its own
    models (see tests/e2e/fake_llms.py)."""
    with Llms() as fakes:
        yield fakes


@pytest.fixture(scope="session", params=["embedded", "redis"])
def stack(
    request: pytest.FixtureRequest,
    third_party: FakeThirdParty,
    oauth2_provider: FakeOAuth2Provider,
    llms: Llms,
    closed_port: int,
    mcp_servers: McpServers,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    url = request.getfixturevalue("redis_url") if request.param == "redis" else None
    data_dir: Path = tmp_path_factory.mktemp(f"data-{request.param}")
    ports = (
        third_party.port,
        closed_port,
        llms.openai.port,
        llms.anthropic.port,
        oauth2_provider.port,
        mcp_servers.port,
        mcp_servers.locked_port,
    )
    allow = ",".join([*(f"127.0.0.1:{port}" for port in ports), f"localhost:{llms.openai.port}"])
    # The install's own OpenAI key, to be sent to 127.0.0.1 only (not to "localhost", the same server by another name).
    metrics_ports = {name: free_port() for name in ("agent", "tool", "integrator")}
    env = {
        "ALTAN_OPENAI_API_KEY": INSTALL_KEY,
        "ALTAN_OPENAI_API_HOSTS": "127.0.0.1",
        **{f"ALTAN_{name.upper()}_METRICS_PORT": str(port) for name, port in metrics_ports.items()},
    }
    running = start_stack(data_dir=data_dir, egress_allow=allow, redis_url=url, extra_env=env)
    running.internal_ports.update({f"{name}-metrics": port for name, port in metrics_ports.items()})
    yield running
    try:
        code = running.stop()
        assert code == 0, f"altan up did not stop cleanly ({code}):\n{running.logs()[-5000:]}"
    finally:
        if url:  # the stack has stopped: nothing writes any more
            left = remove_session_keys(url)
            assert not left, f"this session left keys in Redis: {left[:10]}"


@pytest.fixture
def tenant() -> str:
    """A fresh tenant per test, so tests never see each other's data (even in a shared Redis), carrying the
    session's marker so that the session removes its keys at the end."""
    return new_tenant()
