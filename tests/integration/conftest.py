"""Shared session fixtures of the integration tests: one real redis-server on a free loopback port, persistence
off, its files in a temporary folder; stopped at the end of the session. Keep this small: other fixtures live
in the test modules that need them, helpers in support.py."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from support import RedisServer, redis_server_in


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A real redis-server (``apt-get install redis-server``) for the whole session."""
    with redis_server_in(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(scope="session")
def redis_url(redis_server: RedisServer) -> str:
    """The URL of the session's redis-server (db 0). Tests use unique keys; nothing is flushed between tests."""
    return redis_server.url
