"""L3: Redis or Valkey, through redis-py, with values split into parts.

Theory of operation
-------------------
A value of ``n`` bytes is stored as ``ceil(n / part_bytes)`` part keys
(``PREFIX<hex>:<i>``) and one small header key (``PREFIX<hex>``) holding magic, part
count, part size, length and ``checksum64``. Every batched operation is one or two
pipelines (one network round trip each, no MULTI).

Rule 1 - never partial. A put writes the parts first and the header last; a get reads
the header and all parts in one pipeline and serves the value only when the header is
sound, every part is there with the right size, and the checksum matches. A missing
part (evicted by ``maxmemory``, expired, deleted) is a MISS; a wrong size or checksum is
CORRUPT. Either way the leftovers are deleted.

Rule 2 - bounded and quiet failure. Connect and read timeouts are short (0.25 s /
0.5 s by default) and redis-py's own retries are off. A connection error or timeout
answers UNAVAILABLE for the batch, increments ``errors``, and opens a ``Breaker``: for
the back-off period calls return UNAVAILABLE without touching the network. Nothing is
raised into the caller.

Rule 3 - expiry. With ``ttl_s`` every key is written with that TTL; Redis' own
eviction policy bounds memory. ``prepare_get`` therefore cannot pin (``pins=False``).
"""

from __future__ import annotations

import logging
import math
import re
import struct
from collections.abc import Callable, Sequence
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

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

__all__ = ["DEFAULT_PART_BYTES", "RedisTier"]

log = logging.getLogger("pdfabric.cache.redis")

DEFAULT_PART_BYTES = 1 << 20
_MAGIC = b"PDFKVR\x00\x01"
_HEADER = struct.Struct("<8sIIQQ")  # magic, parts, part bytes, length, checksum


def _safe_url(url: str) -> str:
    return re.sub(r"//[^/@]*@", "//", url)


class RedisTier(CacheTier):
    """Chunks in Redis; see the module docstring for layout and failure rules."""

    kind = "redis"
    capabilities = TierCapabilities(persistent=True, shared=True)

    def __init__(
        self,
        url: str,
        *,
        name: str | None = None,
        password: str | None = None,
        ttl_s: int | None = None,
        prefix: str = "pdfabric:kv:",
        part_bytes: int = DEFAULT_PART_BYTES,
        connect_timeout_s: float = 0.25,
        timeout_s: float = 0.5,
        max_value_bytes: int = 1 << 30,
        ssl_ca_certs: str | None = None,
        backoff_s: float = 1.0,
        socket_read_size: int = 1 << 20,
    ) -> None:
        super().__init__(name)
        if part_bytes <= 0 or part_bytes > 512 << 20:
            raise ValueError(f"part_bytes must be in 1..512MiB (Redis' value limit), got {part_bytes}")
        self.url = _safe_url(url)
        self.part_bytes = part_bytes
        self._ttl = ttl_s
        self._prefix = prefix.encode("utf-8")
        self._max_value = max_value_bytes
        extra: dict[str, Any] = {"ssl_ca_certs": ssl_ca_certs} if ssl_ca_certs else {}
        self._client = redis.Redis.from_url(
            url,
            password=password,
            socket_connect_timeout=connect_timeout_s,
            socket_timeout=timeout_s,
            socket_read_size=socket_read_size,  # redis-py's 32 KiB costs ~20% on MiB values
            retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
            **extra,
        )
        self._breaker = Breaker(f"redis cache tier {self.name!r} at {self.url}", log, backoff_s=backoff_s)

    # ---- plumbing -----------------------------------------------------------------------

    def _hkey(self, key: bytes) -> bytes:
        return self._prefix + key.hex().encode()

    def _pkey(self, key: bytes, i: int) -> bytes:
        return b"%s%s:%d" % (self._prefix, key.hex().encode(), i)

    def _run(self, build: Callable[[Any], None]) -> list[Any] | None:
        """Execute one pipeline; None (and the breaker opened) when Redis is unavailable."""
        self._check_open()
        if not self._breaker.allow():
            return None
        try:
            with self._client.pipeline(transaction=False) as pipe:
                build(pipe)
                result = pipe.execute(raise_on_error=False)
        except (redis.RedisError, OSError) as exc:
            with self._lock:
                self._counters.errors += 1
            self._breaker.failure(exc)
            return None
        self._breaker.success()
        return result

    def _header(self, raw: Any) -> tuple[int, int, int, int] | None:
        """(parts, part bytes, length, checksum) of a sound header, else None."""
        if not isinstance(raw, bytes) or len(raw) != _HEADER.size:
            return None
        magic, parts, part_bytes, length, checksum = _HEADER.unpack(raw)
        if magic != _MAGIC or part_bytes <= 0 or parts != math.ceil(length / part_bytes):
            return None
        return parts, part_bytes, length, checksum

    def _drop(self, keys: Sequence[tuple[bytes, int]]) -> None:
        """Best-effort delete of (key, parts) leftovers of partial or corrupt values."""
        if keys:
            self._run(lambda p: [p.delete(self._hkey(k), *[self._pkey(k, i) for i in range(n)]) for k, n in keys])

    def _count(self, outs: Sequence[GetOutcome], nbytes: int) -> None:
        with self._lock:
            c = self._counters
            for o in outs:
                if o is GetOutcome.HIT:
                    c.hits += 1
                elif o is GetOutcome.MISS:
                    c.misses += 1
                elif o is GetOutcome.CORRUPT:
                    c.corrupt += 1
                elif o is GetOutcome.ERROR:
                    c.errors += 1
            c.bytes_read += nbytes

    # ---- reads --------------------------------------------------------------------------

    def contains(self, keys: Sequence[ChunkKey]) -> list[bool]:
        if not keys:
            return []
        res = self._run(lambda p: [p.exists(self._hkey(k)) for k in keys])
        return [False] * len(keys) if res is None else [r == 1 for r in res]

    def _assemble(self, head: tuple[int, int, int, int], parts: Sequence[Any], dst: memoryview) -> GetOutcome:
        nparts, size, length, checksum = head
        if any(p is None for p in parts):
            return GetOutcome.MISS  # a part expired or was evicted: never serve a partial value
        off = 0
        for i, p in enumerate(parts):
            want = size if i < nparts - 1 else length - size * (nparts - 1)
            if not isinstance(p, bytes) or len(p) != want:
                return GetOutcome.CORRUPT
            dst[off : off + want] = p
            off += want
        return GetOutcome.HIT if checksum64(dst) == checksum else GetOutcome.CORRUPT

    def _parts_for(self, n: int) -> int:
        return max(1, math.ceil(n / self.part_bytes))

    def _fetch_parts(self, keys: Sequence[bytes], counts: Sequence[int], with_header: bool) -> list[Any] | None:
        def build(p: Any) -> None:
            for k, n in zip(keys, counts):
                if with_header:
                    p.get(self._hkey(k))
                for i in range(n):
                    p.get(self._pkey(k, i))

        return self._run(build) if keys else []

    def get_into(self, keys: Sequence[ChunkKey], buffers: Sequence[Any]) -> list[GetOutcome]:
        """One round trip: the header and the parts a value of ``len(buffer)`` bytes has
        with our ``part_bytes``; a second one for values written with another part size."""
        if len(buffers) != len(keys):
            raise ValueError(f"get_into: {len(keys)} keys but {len(buffers)} buffers")
        dsts = [as_byte_view(b, writable=True) for b in buffers]
        counts = [self._parts_for(len(d)) for d in dsts]
        res = self._fetch_parts(keys, counts, with_header=True)
        if res is None:
            return [GetOutcome.UNAVAILABLE] * len(keys)
        outs: list[GetOutcome] = []
        heads: list[tuple[int, int, int, int] | None] = []
        again: list[int] = []
        off = 0
        for i, (n, d) in enumerate(zip(counts, dsts)):
            raw, parts = res[off], res[off + 1 : off + 1 + n]
            off += 1 + n
            head = self._header(raw) if isinstance(raw, bytes) else None
            heads.append(head)
            if isinstance(raw, Exception) or any(isinstance(x, Exception) for x in parts):
                outs.append(GetOutcome.ERROR)
            elif raw is None:
                outs.append(GetOutcome.MISS)
            elif head is None or head[2] != len(d):
                outs.append(GetOutcome.CORRUPT)
            elif head[0] != n or head[1] != self.part_bytes:
                outs.append(GetOutcome.MISS)  # written with another part size: fetched below
                again.append(i)
            else:
                outs.append(self._assemble(head, parts, d))
        if again:
            self._refetch(keys, dsts, heads, again, outs)
        self._finish_get(keys, outs, heads, dsts)
        return outs

    def _refetch(self, keys: Sequence[ChunkKey], dsts: Sequence[memoryview], heads: list[Any],
                 again: list[int], outs: list[GetOutcome]) -> None:  # fmt: skip
        res = self._fetch_parts([keys[i] for i in again], [heads[i][0] for i in again], with_header=False)
        off = 0
        for i in again:
            n = heads[i][0]
            parts = [] if res is None else res[off : off + n]
            off += n
            if res is None:
                outs[i] = GetOutcome.UNAVAILABLE
            elif any(isinstance(x, Exception) for x in parts):
                outs[i] = GetOutcome.ERROR
            else:
                outs[i] = self._assemble(heads[i], parts, dsts[i])

    def _finish_get(self, keys: Sequence[ChunkKey], outs: list[GetOutcome], heads: list[Any],
                    dsts: Sequence[memoryview]) -> None:  # fmt: skip
        """Drop leftovers of partial or corrupt values; count."""
        drop = [
            (k, max(self._parts_for(len(d)), h[0] if h else 0))
            for k, o, h, d in zip(keys, outs, heads, dsts)
            if o is GetOutcome.CORRUPT or (o is GetOutcome.MISS and h is not None)
        ]
        self._drop(drop)
        self._count(outs, sum(len(d) for o, d in zip(outs, dsts) if o is GetOutcome.HIT))

    def get(self, keys: Sequence[ChunkKey]) -> list[GetResult]:
        """Two round trips: headers (to learn the lengths), then ``get_into``."""
        res = self._run(lambda p: [p.get(self._hkey(k)) for k in keys]) if keys else []
        if res is None:
            return [GetResult(GetOutcome.UNAVAILABLE)] * len(keys)
        results = [GetResult(GetOutcome.MISS)] * len(keys)
        want: list[int] = []
        bufs: list[memoryview] = []
        bad: list[tuple[bytes, int]] = []
        for i, (k, raw) in enumerate(zip(keys, res)):
            head = self._header(raw) if raw is not None else None
            if head is not None:
                want.append(i)
                bufs.append(memoryview(bytearray(head[2])))
            elif raw is not None:
                results[i] = GetResult(GetOutcome.CORRUPT)
                bad.append((k, 0))
        outs = self.get_into([keys[i] for i in want], bufs) if want else []
        for i, buf, o in zip(want, bufs, outs):
            results[i] = GetResult(o, buf if o is GetOutcome.HIT else None)
        taken = set(want)
        self._count([r.outcome for i, r in enumerate(results) if i not in taken], 0)
        self._drop(bad)
        return results

    # ---- writes -------------------------------------------------------------------------

    def max_value_bytes(self) -> int:
        return self._max_value

    def put(self, items: Sequence[tuple[ChunkKey, Any]]) -> list[PutOutcome]:
        """Two round trips: EXISTS of the headers, then the parts and headers of new values."""
        vals = [(k, as_byte_view(v)) for k, v in items]
        outs: list[PutOutcome | None] = [
            PutOutcome.REJECTED_TOO_LARGE if len(v) > self._max_value else None for _, v in vals
        ]
        todo = [i for i, o in enumerate(outs) if o is None]
        present = self.contains([vals[i][0] for i in todo]) if todo else []
        for i, p in zip(todo, present):
            if p:
                outs[i] = PutOutcome.EXISTS
        write = [i for i in todo if outs[i] is None]
        res = self._run(lambda p: [self._queue_put(p, *vals[i]) for i in write]) if write else []
        if res is None:
            return [o or PutOutcome.UNAVAILABLE for o in outs]
        off, failed = 0, []
        for i in write:
            n = self._parts_for(len(vals[i][1])) + 1
            errs = [r for r in res[off : off + n] if isinstance(r, Exception)]
            off += n
            if errs:  # e.g. OOM under maxmemory with a noeviction policy
                full = isinstance(errs[0], redis.exceptions.OutOfMemoryError) or str(errs[0]).startswith("OOM")
                outs[i] = PutOutcome.NO_SPACE if full else PutOutcome.ERROR
                failed.append((vals[i][0], n - 1))
        self._drop(failed)
        stored = [i for i in write if outs[i] is None]
        with self._lock:
            self._counters.rejected += sum(1 for o in outs if o in (PutOutcome.REJECTED_TOO_LARGE, PutOutcome.NO_SPACE))
            self._counters.errors += sum(1 for o in outs if o is PutOutcome.ERROR)
            self._counters.stores += len(stored)
            self._counters.bytes_written += sum(len(vals[i][1]) for i in stored)
        return [o or PutOutcome.STORED for o in outs]

    def _queue_put(self, pipe: Any, key: bytes, data: memoryview) -> None:
        n, size = len(data), self.part_bytes
        nparts = self._parts_for(n)
        for i in range(nparts):
            pipe.set(self._pkey(key, i), data[i * size : (i + 1) * size], ex=self._ttl)
        header = _HEADER.pack(_MAGIC, nparts, size, n, checksum64(data))
        pipe.set(self._hkey(key), header, ex=self._ttl)

    def delete(self, keys: Sequence[ChunkKey]) -> int:
        res = self._run(lambda p: [p.get(self._hkey(k)) for k in keys]) if keys else []
        if not res:
            return 0
        heads = [(k, self._header(r)) for k, r in zip(keys, res) if r is not None]
        self._drop([(k, h[0] if h else 0) for k, h in heads])
        return len(heads)

    def delete_prefix(self, prefix: bytes) -> int:
        """SCAN for ``PREFIX<hex of prefix>*`` and delete in batches; counts values (headers)."""
        self._check_open()
        if not self._breaker.allow():
            return 0
        pattern = self._prefix + prefix.hex().encode() + b"*"
        values = 0
        try:
            batch: list[bytes] = []
            for name in self._client.scan_iter(match=pattern, count=1000):
                batch.append(name)
                values += 0 if b":" in name[len(self._prefix):] else 1
                if len(batch) >= 1000:
                    self._client.delete(*batch)
                    batch = []
            if batch:
                self._client.delete(*batch)
        except (redis.RedisError, OSError) as exc:
            with self._lock:
                self._counters.errors += 1
            self._breaker.failure(exc)
        else:
            self._breaker.success()
        return values

    # ---- stats and lifecycle ------------------------------------------------------------

    def _gauges(self) -> dict[str, int]:
        return {"entries": 0, "bytes_used": 0, "capacity_bytes": 0, "pinned": 0}

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._client.close()
