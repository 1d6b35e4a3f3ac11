"""Fixtures shared by the unit and end-to-end suites."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.redis_server import RedisServer


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A running redis-server of this test's own (not the shared one), to stop and start again."""
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()
