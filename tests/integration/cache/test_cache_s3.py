"""S3 tier against moto's S3-compatible server: round trips, truncated objects, and
bounded, quiet failure when the endpoint is dead."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

import boto3
import numpy as np
import pytest

from pdfabric.cache import GetOutcome, PutOutcome
from pdfabric.cache.s3_tier import S3Tier
from pdfabric.testing.cache_data import CHUNK_F32, make_chunks, make_keys
from pdfabric.testing.servers import MotoServer, free_port

pytestmark = pytest.mark.integration

CREDS = dict(region="us-east-1", access_key="test-access", secret_key="test-secret")


def _dsts(n: int) -> list[np.ndarray]:
    return [np.zeros(CHUNK_F32, dtype=np.uint8) for _ in range(n)]


@pytest.fixture(scope="module")
def raw(moto_server: MotoServer) -> Iterator[Any]:
    client = boto3.session.Session().client(
        "s3", endpoint_url=moto_server.endpoint, region_name="us-east-1",
        aws_access_key_id="test-access", aws_secret_access_key="test-secret",
    )  # fmt: skip
    client.create_bucket(Bucket="kv-cache")
    yield client
    client.close()


@pytest.fixture
def tier(moto_server: MotoServer, raw: Any, request: pytest.FixtureRequest) -> Iterator[S3Tier]:
    t = S3Tier("kv-cache", endpoint=moto_server.endpoint, prefix=f"{request.node.name}/", **CREDS)  # type: ignore[arg-type]
    yield t
    t.close()


def test_round_trip(tier: S3Tier, raw: Any) -> None:
    keys, chunks = make_keys(4), make_chunks(4, CHUNK_F32)
    assert tier.put(list(zip(keys, chunks))) == [PutOutcome.STORED] * 4
    assert tier.put([(keys[0], chunks[0])]) == [PutOutcome.EXISTS]
    head = raw.head_object(Bucket="kv-cache", Key=f"{tier.prefix}{keys[0].hex()}")
    assert head["ContentLength"] == CHUNK_F32 and "pdfabric-checksum" in head["Metadata"]
    dsts = _dsts(4)
    assert tier.get_into(keys, dsts) == [GetOutcome.HIT] * 4
    assert all(np.array_equal(a, b) for a, b in zip(chunks, dsts))
    other = make_keys(1, "other")
    got = tier.get([keys[1], other[0]])
    assert got[0].outcome is GetOutcome.HIT and bytes(got[0].data) == chunks[1].tobytes()
    assert got[1].outcome is GetOutcome.MISS
    assert tier.contains(keys + other) == [True] * 4 + [False]
    assert tier.delete(keys[:2]) == 2 and tier.contains(keys[:2]) == [False, False]
    s = tier.stats()
    assert (s.hits, s.misses, s.stores, s.errors) == (5, 1, 4, 0)


def test_truncated_or_altered_object_is_corrupt_and_dropped(tier: S3Tier, raw: Any) -> None:
    keys, chunks = make_keys(2), make_chunks(2, CHUNK_F32)
    tier.put(list(zip(keys, chunks)))
    names = [f"{tier.prefix}{k.hex()}" for k in keys]
    meta = raw.head_object(Bucket="kv-cache", Key=names[0])["Metadata"]
    raw.put_object(Bucket="kv-cache", Key=names[0], Body=chunks[0].tobytes()[:-1000], Metadata=meta)
    altered = bytearray(chunks[1].tobytes())
    altered[4242] ^= 1
    raw.put_object(Bucket="kv-cache", Key=names[1], Body=bytes(altered),
                   Metadata=raw.head_object(Bucket="kv-cache", Key=names[1])["Metadata"])  # fmt: skip
    assert tier.get_into(keys, _dsts(2)) == [GetOutcome.CORRUPT, GetOutcome.CORRUPT]
    assert tier.contains(keys) == [False, False] and tier.stats().corrupt == 2


def test_dead_endpoint_is_a_quick_unavailable(caplog: pytest.LogCaptureFixture) -> None:
    keys, chunks = make_keys(3), make_chunks(3, CHUNK_F32)
    with caplog.at_level(logging.WARNING, logger="pdfabric.cache.s3"), \
            S3Tier("kv-cache", endpoint=f"http://127.0.0.1:{free_port()}", **CREDS) as t:  # type: ignore[arg-type]  # fmt: skip
        t0 = time.monotonic()
        assert t.get_into(keys, _dsts(3)) == [GetOutcome.UNAVAILABLE] * 3
        assert t.put(list(zip(keys, chunks))) == [PutOutcome.UNAVAILABLE] * 3
        assert t.contains(keys) == [False] * 3
        assert time.monotonic() - t0 < 1.5
        assert t.stats().errors == 1
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "s3 cache tier" in warnings[0].getMessage()
    assert "test-secret" not in caplog.text


def test_missing_bucket_is_unavailable_not_raised(moto_server: MotoServer) -> None:
    keys = make_keys(1)
    with S3Tier("no-such-bucket", endpoint=moto_server.endpoint, **CREDS) as t:  # type: ignore[arg-type]
        assert t.get_into(keys, _dsts(1)) == [GetOutcome.UNAVAILABLE]  # NoSuchBucket: misconfigured
        assert t.put([(keys[0], make_chunks(1, CHUNK_F32)[0])]) == [PutOutcome.UNAVAILABLE]


def test_delete_prefix(tier: S3Tier) -> None:
    keys, chunks = make_keys(3), make_chunks(3, CHUNK_F32)
    tier.put(list(zip(keys, chunks)))
    assert tier.delete_prefix(keys[0][:2]) == 1
    assert tier.contains(keys) == [False, True, True]
    assert tier.clear() == 2 and tier.contains(keys) == [False] * 3
