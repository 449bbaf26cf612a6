"""The shared redis-server helper of the integration fixtures (support.py), with a real redis-server."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import redis
from support import RedisServer, redis_server_in, start_redis_server

pytestmark = pytest.mark.integration


def test_private_redis_answers_allows_debug_only_when_asked_and_is_stopped_after(tmp_path: Path) -> None:
    (tmp_path / "plain").mkdir()
    (tmp_path / "debug").mkdir()
    with redis_server_in(tmp_path / "plain") as plain, redis_server_in(tmp_path / "debug", debug_command=True) as debug:
        assert plain.port != debug.port
        with plain.client() as a, debug.client() as b:
            assert a.set("k", "v") and a.get("k") == b"v" and b.get("k") is None  # two separate servers
            with pytest.raises(redis.ResponseError, match="DEBUG command not allowed"):
                a.execute_command("DEBUG", "SLEEP", 0)
            assert b.execute_command("DEBUG", "SLEEP", 0)
    with pytest.raises(redis.ConnectionError), redis.Redis.from_url(debug.url, socket_timeout=2) as gone:
        gone.ping()


def test_a_redis_server_that_cannot_listen_fails_the_test_with_its_log(tmp_path: Path) -> None:
    with socket.socket() as taken:  # a real listener on the port the server is told to use
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(pytest.fail.Exception, match=r"(?s)redis-server exited \(1\).*Failed listening on port"):
            start_redis_server(tmp_path, port=taken.getsockname()[1])


def test_the_session_redis_server_of_conftest_answers_and_logs(redis_server: RedisServer, redis_url: str) -> None:
    assert redis_url == redis_server.url == f"redis://127.0.0.1:{redis_server.port}/0"
    with redis_server.client() as client:
        assert client.ping()
    assert "Ready to accept connections" in redis_server.log.read_text()
