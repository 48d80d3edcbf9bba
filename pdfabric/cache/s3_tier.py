"""L3: an S3-compatible object store (AWS S3, MinIO, Ceph RGW, ...), through boto3.

Theory of operation
-------------------
One object per chunk, ``PREFIX<hex>``, with the value as body and its length and
``checksum64`` in user metadata. Batches fan out over a small thread pool (boto3 clients
are thread-safe); each call is one request.

Rule 1 - never partial. A get serves the body only when the object's length matches the
caller's buffer and its metadata, the whole body arrived, and the checksum matches;
otherwise CORRUPT (and the object is deleted). S3 writes are atomic per object.

Rule 2 - bounded and quiet failure. botocore's connect/read timeouts are short and
retries are limited to the first attempt. A connection error, timeout or server error
answers UNAVAILABLE, increments ``errors`` and opens a ``Breaker`` (no requests during
the back-off); the remaining requests of that batch are skipped. Nothing is raised into
the caller. A 404 is a plain MISS.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import boto3
import botocore.config
import botocore.exceptions

from pdfabric.cache.breaker import Breaker
from pdfabric.cache.checksum import checksum64
from pdfabric.cache.keys import ChunkKey
from pdfabric.cache.tier import (
    CacheTier,
    GetOutcome,
    GetResult,
    PutOutcome,
    TierCapabilities,
    as_byte_view,
)

__all__ = ["S3Tier"]

log = logging.getLogger("pdfabric.cache.s3")

_LEN = "pdfabric-length"
_SUM = "pdfabric-checksum"
_NOT_FOUND = {"404", "NoSuchKey", "NotFound"}
_T = TypeVar("_T")


class _Unavailable(Exception):
    """The batch was cut short: the store failed on another request of it."""


def _not_found(exc: botocore.exceptions.ClientError) -> bool:
    return str(exc.response.get("Error", {}).get("Code")) in _NOT_FOUND


class S3Tier(CacheTier):
    """Chunks as S3 objects; see the module docstring for the failure rules."""

    kind = "s3"
    capabilities = TierCapabilities(persistent=True, shared=True)

    def __init__(
        self,
        bucket: str,
        *,
        endpoint: str | None = None,
        prefix: str = "",
        region: str | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        name: str | None = None,
        connect_timeout_s: float = 0.5,
        read_timeout_s: float = 2.0,
        max_workers: int = 8,
        max_value_bytes: int = 5 << 30,
        backoff_s: float = 1.0,
    ) -> None:
        super().__init__(name)
        self.bucket = bucket
        self.prefix = prefix
        self._max_value = max_value_bytes
        config = botocore.config.Config(
            connect_timeout=connect_timeout_s,
            read_timeout=read_timeout_s,
            retries={"max_attempts": 1, "mode": "standard"},
            max_pool_connections=max_workers,
            s3={"addressing_style": "path"} if endpoint else None,
        )
        session = boto3.session.Session()
        self._client = session.client(
            "s3",
            endpoint_url=endpoint,
            region_name=region,
            aws_access_key_id=access_key,
            aws_secret_access_key=secret_key,
            config=config,
        )
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix=f"pdfabric-s3-{self.name}")
        where = endpoint or "AWS"
        what = f"s3 cache tier {self.name!r} (s3://{bucket}/{prefix} at {where})"
        self._breaker = Breaker(what, log, backoff_s=backoff_s)

    # ---- plumbing -----------------------------------------------------------------------

    def _okey(self, key: bytes) -> str:
        return f"{self.prefix}{key.hex()}"

    def _batch(self, fn: Callable[[int], _T], n: int, unavailable: _T) -> list[_T]:
        """Run ``fn(i)`` for i in range(n) on the pool; UNAVAILABLE-ish answers on failure."""
        self._check_open()
        if n == 0:
            return []
        if not self._breaker.allow():
            return [unavailable] * n
        failed = threading.Event()

        def one(i: int) -> _T:
            if failed.is_set():
                return unavailable
            try:
                return fn(i)
            except _Unavailable as exc:
                if not failed.is_set():
                    failed.set()
                    with self._lock:
                        self._counters.errors += 1
                    self._breaker.failure(exc.__cause__ or exc)
                return unavailable

        results = list(self._pool.map(one, range(n))) if n > 1 else [one(0)]
        if not failed.is_set():
            self._breaker.success()
        return results

    def _call(self, what: str, **kwargs: Any) -> Any:
        """One client call; None on 404; ``_Unavailable`` on any other failure."""
        try:
            return getattr(self._client, what)(Bucket=self.bucket, **kwargs)
        except botocore.exceptions.ClientError as exc:
            if _not_found(exc):
                return None
            raise _Unavailable(str(exc)) from exc
        except (botocore.exceptions.BotoCoreError, OSError) as exc:
            raise _Unavailable(str(exc)) from exc

    def _count(self, outs: Sequence[GetOutcome], nbytes: int) -> None:
        with self._lock:
            c = self._counters
            c.hits += sum(1 for o in outs if o is GetOutcome.HIT)
            c.misses += sum(1 for o in outs if o is GetOutcome.MISS)
            c.corrupt += sum(1 for o in outs if o is GetOutcome.CORRUPT)
            c.bytes_read += nbytes

    # ---- reads --------------------------------------------------------------------------

    def contains(self, keys: Sequence[ChunkKey]) -> list[bool]:
        return self._batch(lambda i: self._call("head_object", Key=self._okey(keys[i])) is not None, len(keys), False)

    def _fetch(self, key: bytes, dst: memoryview | None) -> tuple[GetOutcome, memoryview | None]:
        resp = self._call("get_object", Key=self._okey(key))
        if resp is None:
            return GetOutcome.MISS, None
        body = resp["Body"]
        try:
            meta = resp.get("Metadata", {})
            length = int(resp.get("ContentLength", -1))
            want = length if dst is None else len(dst)
            if meta.get(_LEN) != str(want) or length != want:
                return GetOutcome.CORRUPT, None
            buf = dst if dst is not None else memoryview(bytearray(length))
            got = 0
            while got < length:
                n = body.readinto(buf[got:])
                if not n:
                    break
                got += n
        except (botocore.exceptions.BotoCoreError, OSError) as exc:
            raise _Unavailable(str(exc)) from exc
        finally:
            body.close()
        if got != length or meta.get(_SUM) != f"{checksum64(buf):016x}":
            return GetOutcome.CORRUPT, None
        return GetOutcome.HIT, buf

    def _fetch_all(
        self, keys: Sequence[ChunkKey], dsts: Sequence[memoryview | None]
    ) -> list[tuple[GetOutcome, memoryview | None]]:
        res = self._batch(lambda i: self._fetch(keys[i], dsts[i]), len(keys), (GetOutcome.UNAVAILABLE, None))
        self._count([o for o, _ in res], sum(len(b) for o, b in res if o is GetOutcome.HIT and b is not None))
        bad = [k for k, (o, _) in zip(keys, res) if o is GetOutcome.CORRUPT]
        if bad:
            self._batch(lambda i: self._call("delete_object", Key=self._okey(bad[i])), len(bad), None)
        return res

    def get_into(self, keys: Sequence[ChunkKey], buffers: Sequence[Any]) -> list[GetOutcome]:
        if len(buffers) != len(keys):
            raise ValueError(f"get_into: {len(keys)} keys but {len(buffers)} buffers")
        dsts = [as_byte_view(b, writable=True) for b in buffers]
        return [o for o, _ in self._fetch_all(keys, dsts)]

    def get(self, keys: Sequence[ChunkKey]) -> list[GetResult]:
        return [GetResult(o, b) for o, b in self._fetch_all(keys, [None] * len(keys))]

    # ---- writes -------------------------------------------------------------------------

    def max_value_bytes(self) -> int:
        return self._max_value

    def _store(self, key: bytes, data: memoryview) -> PutOutcome:
        if self._call("head_object", Key=self._okey(key)) is not None:
            return PutOutcome.EXISTS
        meta = {_LEN: str(len(data)), _SUM: f"{checksum64(data):016x}"}
        self._call("put_object", Key=self._okey(key), Body=bytes(data), Metadata=meta)
        return PutOutcome.STORED

    def put(self, items: Sequence[tuple[ChunkKey, Any]]) -> list[PutOutcome]:
        vals = [(k, as_byte_view(v)) for k, v in items]
        todo = [i for i, (_, v) in enumerate(vals) if len(v) <= self._max_value]
        res = self._batch(lambda j: self._store(*vals[todo[j]]), len(todo), PutOutcome.UNAVAILABLE)
        outs = [PutOutcome.REJECTED_TOO_LARGE] * len(vals)
        for i, o in zip(todo, res):
            outs[i] = o
        with self._lock:
            self._counters.rejected += len(vals) - len(todo)
            self._counters.stores += sum(1 for o in res if o is PutOutcome.STORED)
            self._counters.bytes_written += sum(len(vals[i][1]) for i, o in zip(todo, res) if o is PutOutcome.STORED)
        return outs

    def delete(self, keys: Sequence[ChunkKey]) -> int:
        present = self.contains(keys)
        gone = [k for k, p in zip(keys, present) if p]
        self._batch(lambda i: self._call("delete_object", Key=self._okey(gone[i])), len(gone), None)
        return len(gone)

    def delete_prefix(self, prefix: bytes) -> int:
        """List ``PREFIX<hex of prefix>`` and delete in batches of 1000."""
        self._check_open()
        if not self._breaker.allow():
            return 0
        gone = 0
        try:
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=f"{self.prefix}{prefix.hex()}"
            )
            for page in pages:
                objects = [{"Key": o["Key"]} for o in page.get("Contents", [])]
                if objects:
                    self._client.delete_objects(Bucket=self.bucket, Delete={"Objects": objects, "Quiet": True})
                    gone += len(objects)
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError, OSError) as exc:
            with self._lock:
                self._counters.errors += 1
            self._breaker.failure(exc)
        else:
            self._breaker.success()
        return gone

    # ---- stats and lifecycle ------------------------------------------------------------

    def _gauges(self) -> dict[str, int]:
        return {"entries": 0, "bytes_used": 0, "capacity_bytes": 0, "pinned": 0}

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._pool.shutdown(wait=True)
        self._client.close()
