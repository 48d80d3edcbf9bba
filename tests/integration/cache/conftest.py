"""Real backing stores for the cache tests: one ``redis-server`` and one moto S3 server
per session on free 127.0.0.1 ports, stopped by pid at the end. Tests that kill or freeze
Redis start their own (``make_redis``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from pdfabric.testing.servers import MotoServer, RedisServer, redis_server_available


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    if not redis_server_available():
        pytest.skip("redis-server is not installed (apt-get install redis-server; `make setup` does it)")
    srv = RedisServer()
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def make_redis() -> Iterator[Callable[..., RedisServer]]:
    """``make_redis(password=None)``: a redis-server of the test's own, stopped afterwards."""
    if not redis_server_available():
        pytest.skip("redis-server is not installed (apt-get install redis-server; `make setup` does it)")
    started: list[RedisServer] = []

    def make(**kwargs: object) -> RedisServer:
        srv = RedisServer(**kwargs)  # type: ignore[arg-type]
        started.append(srv)
        srv.start()
        return srv

    try:
        yield make
    finally:
        for srv in started:
            srv.stop()


@pytest.fixture(scope="session")
def moto_server() -> Iterator[MotoServer]:
    srv = MotoServer()
    srv.start(timeout=60)
    try:
        yield srv
    finally:
        srv.stop()
