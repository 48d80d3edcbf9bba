"""Redis tier against a real redis-server: round trips, parts, never-partial values,
and bounded, quiet failure when Redis dies or hangs."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import redis

from pdfabric.cache import GetOutcome, MemoryTier, PutOutcome, TieredCache
from pdfabric.cache.redis_tier import RedisTier
from pdfabric.testing.cache_data import CHUNK_F32, make_chunks, make_keys
from pdfabric.testing.servers import RedisServer

pytestmark = pytest.mark.integration

BOUND_S = 1.5  # connect 0.25 s / read 0.5 s timeouts, plus slack for a loaded machine


def _dsts(n: int, size: int = CHUNK_F32) -> list[np.ndarray]:
    return [np.zeros(size, dtype=np.uint8) for _ in range(n)]


@pytest.fixture
def raw(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url)
    client.flushdb()
    yield client
    client.close()


@pytest.fixture
def tier(redis_server: RedisServer, raw: redis.Redis) -> Iterator[RedisTier]:
    t = RedisTier(redis_server.url, part_bytes=300_000)  # 1 MiB chunks in 4 parts
    yield t
    t.close()


def test_round_trip_in_parts(tier: RedisTier, raw: redis.Redis) -> None:
    keys, chunks = make_keys(4), make_chunks(4, CHUNK_F32)
    assert tier.put(list(zip(keys, chunks))) == [PutOutcome.STORED] * 4
    assert tier.put([(keys[0], chunks[0])]) == [PutOutcome.EXISTS]
    assert raw.exists(f"pdfabric:kv:{keys[0].hex()}:3") and not raw.exists(f"pdfabric:kv:{keys[0].hex()}:4")
    dsts = _dsts(4)
    assert tier.get_into(keys, dsts) == [GetOutcome.HIT] * 4
    assert all(np.array_equal(a, b) for a, b in zip(chunks, dsts))
    other = make_keys(1, "other")
    got = tier.get([keys[2], other[0]])
    assert got[0].outcome is GetOutcome.HIT and bytes(got[0].data) == chunks[2].tobytes()
    assert got[1].outcome is GetOutcome.MISS
    assert tier.contains(keys + other) == [True] * 4 + [False]
    assert tier.delete(keys[:2] + other) == 2
    assert tier.contains(keys) == [False, False, True, True]
    assert not raw.keys(f"pdfabric:kv:{keys[0].hex()}*")
    s = tier.stats()
    assert (s.hits, s.misses, s.stores, s.errors) == (5, 1, 4, 0)


def test_missing_part_is_a_miss_never_partial_data(tier: RedisTier, raw: redis.Redis) -> None:
    keys, chunks = make_keys(2), make_chunks(2, CHUNK_F32)
    tier.put(list(zip(keys, chunks)))
    raw.delete(f"pdfabric:kv:{keys[0].hex()}:2")  # as maxmemory eviction or expiry would
    dsts = _dsts(2)
    assert tier.get_into(keys, dsts) == [GetOutcome.MISS, GetOutcome.HIT]
    assert not raw.keys(f"pdfabric:kv:{keys[0].hex()}*")  # leftovers removed
    assert tier.get([keys[0]])[0].outcome is GetOutcome.MISS


def test_short_or_altered_part_is_corrupt(tier: RedisTier, raw: redis.Redis) -> None:
    keys, chunks = make_keys(2), make_chunks(2, CHUNK_F32)
    tier.put(list(zip(keys, chunks)))
    raw.set(f"pdfabric:kv:{keys[0].hex()}:1", b"short")
    part = bytearray(raw.get(f"pdfabric:kv:{keys[1].hex()}:0"))
    part[77] ^= 0x10
    raw.set(f"pdfabric:kv:{keys[1].hex()}:0", bytes(part))
    assert tier.get_into(keys, _dsts(2)) == [GetOutcome.CORRUPT, GetOutcome.CORRUPT]
    assert tier.stats().corrupt == 2 and tier.contains(keys) == [False, False]


def test_ttl_and_prefix(redis_server: RedisServer, raw: redis.Redis) -> None:
    keys, chunks = make_keys(1), make_chunks(1, CHUNK_F32)
    with (
        RedisTier(redis_server.url, ttl_s=100, prefix="tenant-a:") as a,
        RedisTier(redis_server.url, prefix="tenant-b:") as b,
    ):
        a.put([(keys[0], chunks[0])])
        assert 0 < raw.ttl(f"tenant-a:{keys[0].hex()}") <= 100
        assert 0 < raw.ttl(f"tenant-a:{keys[0].hex()}:0") <= 100
        assert b.contains(keys) == [False]


def test_password(make_redis: Callable[..., RedisServer], caplog: pytest.LogCaptureFixture) -> None:
    srv = make_redis(password="pw-for-test")
    keys, chunks = make_keys(1), make_chunks(1, CHUNK_F32)
    with RedisTier(srv.url, password="pw-for-test") as ok:
        assert ok.put([(keys[0], chunks[0])]) == [PutOutcome.STORED]
    with (
        caplog.at_level(logging.WARNING, logger="pdfabric.cache.redis"),
        RedisTier(srv.url, password="xyz-not-it") as bad,
    ):
        assert bad.get_into(keys, _dsts(1)) == [GetOutcome.UNAVAILABLE]
        assert bad.stats().errors == 1
    assert "AuthenticationError" in caplog.text or "WRONGPASS" in caplog.text
    assert "pw-for-test" not in caplog.text and "xyz-not-it" not in caplog.text


def _timed(fn: Callable[[], object]) -> tuple[object, float]:
    t0 = time.monotonic()
    out = fn()
    return out, time.monotonic() - t0


def test_killed_redis_degrades_to_unavailable_quickly(
    make_redis: Callable[..., RedisServer], caplog: pytest.LogCaptureFixture
) -> None:
    srv = make_redis()
    keys, chunks = make_keys(3), make_chunks(3, CHUNK_F32)
    with RedisTier(srv.url, backoff_s=0.3) as t:
        assert t.put(list(zip(keys, chunks))) == [PutOutcome.STORED] * 3
        srv.kill()
        with caplog.at_level(logging.INFO, logger="pdfabric.cache.redis"):
            out, took = _timed(lambda: t.get_into(keys, _dsts(3)))
            assert out == [GetOutcome.UNAVAILABLE] * 3 and took < BOUND_S
            out, took = _timed(lambda: t.put(list(zip(keys, chunks))))
            assert out == [PutOutcome.UNAVAILABLE] * 3 and took < BOUND_S
            out, took = _timed(lambda: t.contains(keys))
            assert out == [False] * 3 and took < BOUND_S
            assert t.stats().errors >= 1
            warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
            assert len(warnings) == 1 and "ConnectionError" in warnings[0].getMessage()
            srv.start()  # same port, empty
            time.sleep(0.35)  # past the back-off
            assert t.get_into(keys[:1], _dsts(1)) == [GetOutcome.MISS]
            assert t.put([(keys[0], chunks[0])]) == [PutOutcome.STORED]
        assert "reachable again" in caplog.text


def test_hung_redis_costs_one_bounded_timeout(
    make_redis: Callable[..., RedisServer], caplog: pytest.LogCaptureFixture
) -> None:
    srv = make_redis()
    keys, chunks = make_keys(2), make_chunks(2, CHUNK_F32)
    with RedisTier(srv.url) as t:
        t.put(list(zip(keys, chunks)))
        srv.pause()  # accepts connections, answers nothing
        try:
            with caplog.at_level(logging.WARNING, logger="pdfabric.cache.redis"):
                out, took = _timed(lambda: t.get_into(keys, _dsts(2)))
                assert out == [GetOutcome.UNAVAILABLE] * 2 and took < BOUND_S
                out, took = _timed(lambda: t.get_into(keys, _dsts(2)))  # breaker open: no wait
                assert out == [GetOutcome.UNAVAILABLE] * 2 and took < 0.1
            assert "TimeoutError" in caplog.text and t.stats().errors == 1
        finally:
            srv.resume()


def test_tiered_memory_over_redis(redis_server: RedisServer, raw: redis.Redis) -> None:
    keys, chunks = make_keys(4), make_chunks(4, CHUNK_F32)
    with TieredCache([MemoryTier(8 * CHUNK_F32, CHUNK_F32), RedisTier(redis_server.url)]) as cache:
        assert cache.put(keys, chunks) == [PutOutcome.STORED] * 4
        assert cache.flush(10)
        l1, l3 = cache.tiers
        assert l3.contains(keys) == [True] * 4
        l1.delete(keys[1:])
        dsts = _dsts(4)
        read = cache.get_into(keys, dsts)
        assert read.chunks == 4 and read.sources == ("memory", "redis", "redis", "redis")
        assert all(np.array_equal(a, b) for a, b in zip(chunks, dsts))
        assert l1.contains(keys) == [True] * 4
        assert cache.open_leases() == 0


def test_delete_prefix_stays_in_its_namespace(redis_server: RedisServer, raw: redis.Redis) -> None:
    keys, chunks = make_keys(3), make_chunks(3, CHUNK_F32)
    with RedisTier(redis_server.url, part_bytes=400_000) as a, RedisTier(redis_server.url, prefix="other:") as b:
        a.put(list(zip(keys, chunks)))
        b.put(list(zip(keys, chunks)))
        assert a.delete_prefix(keys[1][:2]) == 1
        assert a.contains(keys) == [True, False, True]
        assert a.clear() == 2 and a.contains(keys) == [False] * 3
        assert b.contains(keys) == [True] * 3
        assert not raw.keys("pdfabric:kv:*")


def test_values_written_with_another_part_size_are_read(tier: RedisTier, redis_server: RedisServer) -> None:
    keys, chunks = make_keys(2), make_chunks(2, CHUNK_F32)
    tier.put(list(zip(keys, chunks)))  # 300 kB parts
    with RedisTier(redis_server.url) as reader:  # 1 MiB parts
        dsts = _dsts(2)
        assert reader.get_into(keys, dsts) == [GetOutcome.HIT] * 2
        assert np.array_equal(dsts[1], chunks[1])


def test_lru_eviction_of_parts_never_serves_partial_values(make_redis: Callable[..., RedisServer]) -> None:
    srv = make_redis(maxmemory="8mb", maxmemory_policy="allkeys-lru")
    keys, chunks = make_keys(16), make_chunks(16, CHUNK_F32)
    with RedisTier(srv.url, part_bytes=256 * 1024) as t:
        for k, c in zip(keys, chunks):
            t.put([(k, c)])
        dsts = _dsts(16)
        outs = t.get_into(keys, dsts)
        assert set(outs) <= {GetOutcome.HIT, GetOutcome.MISS} and GetOutcome.MISS in outs
        for o, c, d in zip(outs, chunks, dsts):
            if o is GetOutcome.HIT:
                assert np.array_equal(c, d)
        assert t.stats().corrupt == 0


def test_full_redis_without_eviction_answers_no_space(make_redis: Callable[..., RedisServer]) -> None:
    srv = make_redis(maxmemory="4mb", maxmemory_policy="noeviction")
    keys, chunks = make_keys(8), make_chunks(8, CHUNK_F32)
    with RedisTier(srv.url) as t:
        outs = [t.put([(k, c)])[0] for k, c in zip(keys, chunks)]
        assert outs[0] is PutOutcome.STORED and outs[-1] is PutOutcome.NO_SPACE
        assert t.stats().rejected >= 1
        assert t.get_into(keys[:1], _dsts(1)) == [GetOutcome.HIT]  # Redis itself still answers
