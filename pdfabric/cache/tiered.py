"""Tiers combined fastest-first: prefix lookups, promotion on hit, write-behind stores.

Theory of operation
-------------------
``tiers[0]`` is the fastest (L1 memory), the last the slowest (L3 Redis/S3).

Rule 1 - prefix hits. Chunk keys chain (``pdfabric.cache.keys``), so only a run of chunks
from the start is usable: ``lookup`` and ``get_into`` report how many *leading* chunks
were found, stopping at the first chunk no tier has.

Rule 2 - fall through, promote. ``get_into`` asks each tier for the chunks the faster
tiers lacked (a CORRUPT or UNAVAILABLE answer counts as a miss there). Chunks found
below L1 are copied into L1 at once, and written behind into the tiers between.

Rule 3 - write-behind. ``put`` stores into ``tiers[0]`` synchronously and queues the
chunks for the slower tiers, which one background thread writes. The queue holds L1
*pins*, not copies: the chunk cannot be evicted from L1 before it is written below.
The queue is bounded; when it is full the job is dropped (``write_behind_dropped``)
rather than blocking the caller.

Rule 4 - admission. With ``admit_after=2`` a chunk is stored only the second time it is
offered ("not seen only once"); a bounded table counts offers.

Rule 5 - two-phase access, for callers that copy straight from/to L1 memory (the cache
server hands L1 slots to engines through shared memory): ``prepare_get`` loads chunks
found below L1 into reserved L1 slots and pins every chunk found, ``complete_get``
unpins; ``prepare_put`` reserves L1 slots, ``complete_put`` publishes them and queues
them for the slower tiers (Rule 3). Both need a memory tier first.
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

from pdfabric.cache.keys import ChunkKey, ChunkKeyer
from pdfabric.cache.tier import (
    CacheTier,
    GetOutcome,
    PutOutcome,
    ReadLease,
    TierStats,
    WriteLease,
    as_byte_view,
)
from pdfabric.errors import CacheError

if TYPE_CHECKING:
    from pdfabric.config.models import CacheConfig, Topology
    from pdfabric.config.secrets import SecretRef
    from pdfabric.layout import LayoutFingerprint

__all__ = ["CacheRead", "CacheStats", "TieredCache", "build_tier"]

log = logging.getLogger("pdfabric.cache")


@dataclass(frozen=True, slots=True)
class CacheRead:
    """``chunks`` leading chunks were loaded; ``sources[i]`` names the tier of chunk i."""

    chunks: int
    sources: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class CacheStats:
    tiers: tuple[TierStats, ...]
    lookup_tokens: int = 0
    hit_tokens: int = 0
    promotions: int = 0
    not_admitted: int = 0
    write_behind_queued: int = 0
    write_behind_dropped: int = 0
    write_behind_errors: int = 0
    write_behind_pending: int = 0

    @property
    def token_hit_ratio(self) -> float:
        """Cached tokens over tokens looked up (0.0 before any lookup)."""
        return self.hit_tokens / self.lookup_tokens if self.lookup_tokens else 0.0


@dataclass(slots=True)
class _Job:
    items: list[tuple[ChunkKey, Any]]
    tiers: Sequence[CacheTier]
    lease: ReadLease | None = None


@dataclass(slots=True)
class _Counts:
    lookup_tokens: int = 0
    hit_tokens: int = 0
    promotions: int = 0
    not_admitted: int = 0
    write_behind_queued: int = 0
    write_behind_dropped: int = 0
    write_behind_errors: int = 0


class TieredCache:
    """Fastest-first tiers behind one batched interface. Thread-safe.

    ``keyer`` (optional) lets ``lookup_tokens`` take token ids. ``write_behind=False``
    writes the slower tiers inline (tests, tools). Owns its tiers: ``close()`` closes them.
    """

    def __init__(
        self,
        tiers: Sequence[CacheTier],
        *,
        keyer: ChunkKeyer | None = None,
        write_behind: bool = True,
        queue_size: int = 1024,
        admit_after: int = 1,
        admission_table_size: int = 1 << 16,
    ) -> None:
        if not tiers:
            raise ValueError("a tiered cache needs at least one tier")
        if admit_after < 1:
            raise ValueError(f"admit_after must be >= 1, got {admit_after}")
        self.tiers = tuple(tiers)
        self.keyer = keyer
        self._admit_after = admit_after
        self._seen: OrderedDict[ChunkKey, int] = OrderedDict()
        self._seen_max = admission_table_size
        self._lock = threading.Lock()
        self._c = _Counts()
        self._lease_ids = itertools.count(1)
        self._read_leases: dict[int, list[ReadLease]] = {}
        self._write_leases: dict[int, tuple[WriteLease, list[int]]] = {}
        self._closed = False
        self._queue: queue.Queue[_Job | None] = queue.Queue(maxsize=queue_size)
        self._thread: threading.Thread | None = None
        if write_behind and len(self.tiers) > 1:
            self._thread = threading.Thread(target=self._drain, name="pdfabric-cache-write-behind", daemon=True)
            self._thread.start()

    # ---- lookups ----------------------------------------------------------------------

    def lookup(self, keys: Sequence[ChunkKey]) -> int:
        """How many leading chunks of ``keys`` some tier holds."""
        pending = list(range(len(keys)))
        for tier in self.tiers:
            if not pending:
                break
            found = tier.contains([keys[i] for i in pending])
            pending = [i for i, f in zip(pending, found) if not f]
        return pending[0] if pending else len(keys)

    def lookup_tokens(self, token_ids: Sequence[int]) -> int:
        """How many leading tokens are cached (whole chunks); counts the token hit ratio."""
        if self.keyer is None:
            raise CacheError("lookup_tokens needs a keyer: build the cache with keyer= or from_config(fingerprint=)")
        chunks = self.lookup(self.keyer.keys(token_ids))
        hit = chunks * self.keyer.chunk_tokens
        with self._lock:
            self._c.lookup_tokens += len(token_ids)
            self._c.hit_tokens += hit
        return hit

    def record_lookup(self, tokens: int, hit_tokens: int) -> None:
        """Count a lookup made by key (a cache server's clients hash the tokens)."""
        with self._lock:
            self._c.lookup_tokens += tokens
            self._c.hit_tokens += hit_tokens

    # ---- reads ------------------------------------------------------------------------

    def get_into(self, keys: Sequence[ChunkKey], buffers: Sequence[Any]) -> CacheRead:
        """Load the leading chunks into ``buffers`` (one per key, each a chunk long).

        Buffers past ``CacheRead.chunks`` hold unspecified bytes.
        """
        if len(buffers) != len(keys):
            raise ValueError(f"get_into: {len(keys)} keys but {len(buffers)} buffers")
        self._check_open()
        sources: list[int | None] = [None] * len(keys)
        pending = list(range(len(keys)))
        for t, tier in enumerate(self.tiers):
            if not pending:
                break
            outs = tier.get_into([keys[i] for i in pending], [buffers[i] for i in pending])
            for i, o in zip(pending, outs):
                if o is GetOutcome.HIT:
                    sources[i] = t
            pending = [i for i, o in zip(pending, outs) if o is not GetOutcome.HIT]
        chunks = pending[0] if pending else len(keys)
        self._promote(keys[:chunks], buffers[:chunks], sources[:chunks])
        return CacheRead(chunks, tuple(self.tiers[s].name for s in sources[:chunks]))  # type: ignore[index]

    def _promote(self, keys: Sequence[ChunkKey], buffers: Sequence[Any], sources: Sequence[int | None]) -> None:
        for t in sorted({s for s in sources if s}):
            idx = [i for i, s in enumerate(sources) if s == t]
            ks, bs = [keys[i] for i in idx], [buffers[i] for i in idx]
            self.tiers[0].put(list(zip(ks, bs)))
            with self._lock:
                self._c.promotions += len(idx)
            if t > 1:
                self._write_below(ks, bs, self.tiers[1:t])

    # ---- two-phase access: views of L1 memory (what the cache server hands out) ----------

    def _l1(self) -> CacheTier:
        l1 = self.tiers[0]
        if not l1.capabilities.zero_copy_views:
            raise CacheError(
                f"prepare_get/prepare_put hand out views of the first tier's memory; "
                f"the first tier is {l1.kind}, make it a memory tier"
            )
        return l1

    def prepare_get(self, keys: Sequence[ChunkKey]) -> ReadLease:
        """Pin every key some tier holds, loading chunks found only below L1 into L1 first.

        ``views[i]`` is a read-only view of L1 memory (``None`` where no tier has key i),
        valid until ``complete_get``. Slower tiers are asked only for keys L1 lacks.
        """
        self._check_open()
        l1 = self._l1()
        first = l1.prepare_get(keys)
        held, outcomes, views = [first], list(first.outcomes), list(first.views)
        missing = [i for i, o in enumerate(first.outcomes) if o is not GetOutcome.HIT]
        if missing and len(self.tiers) > 1:
            loaded = self._load_into_l1([keys[i] for i in missing])
            got = [i for i, ok in zip(missing, loaded) if ok]
            if got:
                second = l1.prepare_get([keys[i] for i in got])
                held.append(second)
                for i, o, v in zip(got, second.outcomes, second.views):
                    outcomes[i], views[i] = o, v
        lease = ReadLease(next(self._lease_ids), "tiered", tuple(keys), tuple(outcomes), tuple(views))
        with self._lock:
            self._read_leases[lease.id] = held
        return lease

    def complete_get(self, lease: ReadLease) -> None:
        """Unpin what ``prepare_get`` pinned."""
        with self._lock:
            held = self._read_leases.pop(lease.id, None)
        if held is None:
            raise CacheError(f"read lease {lease.id} is not open in this cache (completed twice?)")
        for inner in held:
            self.tiers[0].complete_get(inner)

    def _load_into_l1(self, keys: Sequence[ChunkKey]) -> list[bool]:
        """Reserve L1 slots, fill them from the slower tiers, publish what was found."""
        l1 = self.tiers[0]
        size = l1.max_value_bytes()
        rooms = [l1.prepare_put([k], size) for k in keys]
        pending = [i for i, r in enumerate(rooms) if r.buffers[0] is not None]
        found: dict[int, int] = {}
        for t in range(1, len(self.tiers)):
            if not pending:
                break
            outs = self.tiers[t].get_into([keys[i] for i in pending], [rooms[i].buffers[0] for i in pending])
            found.update((i, t) for i, o in zip(pending, outs) if o is GetOutcome.HIT)
            pending = [i for i in pending if i not in found]
        ok = []
        for i, room in enumerate(rooms):
            out = l1.complete_put(room, commit=i in found)[0]
            ok.append(out in (PutOutcome.STORED, PutOutcome.EXISTS))
        with self._lock:
            self._c.promotions += len(found)
        for t in sorted(set(found.values()) - {1}):
            ks = [keys[i] for i, s in found.items() if s == t]
            self._write_below(ks, [None] * len(ks), self.tiers[1:t])
        return ok

    def prepare_put(self, keys: Sequence[ChunkKey], sizes: int | Sequence[int]) -> WriteLease:
        """Room in L1 for the chunks to store (admission applies); fill ``buffers[i]`` where
        set, then ``complete_put``, which also queues them for the slower tiers."""
        self._check_open()
        l1 = self._l1()
        sizes = [sizes] * len(keys) if isinstance(sizes, int) else list(sizes)
        idx = [i for i, a in enumerate(self._admit(keys)) if a]
        inner = l1.prepare_put([keys[i] for i in idx], [sizes[i] for i in idx])
        buffers: list[memoryview | None] = [None] * len(keys)
        outcomes: list[PutOutcome | None] = [PutOutcome.NOT_ADMITTED] * len(keys)
        for j, i in enumerate(idx):
            buffers[i], outcomes[i] = inner.buffers[j], inner.outcomes[j]
        lease = WriteLease(next(self._lease_ids), "tiered", tuple(keys), tuple(buffers), tuple(outcomes))
        with self._lock:
            self._write_leases[lease.id] = (inner, idx)
        return lease

    def complete_put(self, lease: WriteLease, *, commit: bool = True) -> list[PutOutcome]:
        """Publish (or give back) the room of ``prepare_put``; outcomes per key."""
        with self._lock:
            entry = self._write_leases.pop(lease.id, None)
        if entry is None:
            raise CacheError(f"write lease {lease.id} is not open in this cache (completed twice?)")
        inner, idx = entry
        outs = [o if o is not None else PutOutcome.ABORTED for o in lease.outcomes]
        for i, o in zip(idx, self.tiers[0].complete_put(inner, commit=commit)):
            outs[i] = o
        stored = [k for k, o in zip(lease.keys, outs) if o is PutOutcome.STORED]
        if stored and len(self.tiers) > 1:
            self._write_below(stored, [None] * len(stored), self.tiers[1:])
        return outs

    # ---- writes -----------------------------------------------------------------------

    def _admit(self, keys: Sequence[ChunkKey]) -> list[bool]:
        if self._admit_after <= 1:
            return [True] * len(keys)
        out = []
        with self._lock:
            for k in keys:
                n = self._seen.pop(k, 0) + 1
                if n >= self._admit_after:
                    out.append(True)
                    continue
                self._seen[k] = n
                if len(self._seen) > self._seen_max:
                    self._seen.popitem(last=False)
                out.append(False)
            self._c.not_admitted += out.count(False)
        return out

    def put(self, keys: Sequence[ChunkKey], buffers: Sequence[Any]) -> list[PutOutcome]:
        """Store chunks: ``tiers[0]`` now, slower tiers behind. Outcomes are ``tiers[0]``'s."""
        if len(buffers) != len(keys):
            raise ValueError(f"put: {len(keys)} keys but {len(buffers)} buffers")
        self._check_open()
        admitted = self._admit(keys)
        idx = [i for i, a in enumerate(admitted) if a]
        ks, bs = [keys[i] for i in idx], [buffers[i] for i in idx]
        outs = [PutOutcome.NOT_ADMITTED] * len(keys)
        for i, o in zip(idx, self.tiers[0].put(list(zip(ks, bs)))):
            outs[i] = o
        if len(self.tiers) > 1 and ks:
            self._write_below(ks, bs, self.tiers[1:])
        return outs

    def _write_below(self, keys: Sequence[ChunkKey], buffers: Sequence[Any], tiers: Sequence[CacheTier]) -> None:
        """Write to ``tiers``: inline, or queued with L1 pins as the source (a copy of
        ``buffers[i]`` where L1 lacks the chunk; skipped where there is neither)."""
        l1 = self.tiers[0]
        lease = l1.prepare_get(keys) if l1.capabilities.zero_copy_views else None
        views = lease.views if lease is not None else [None] * len(keys)
        if self._thread is None:
            try:
                items = [(k, v if v is not None else b) for k, v, b in zip(keys, views, buffers)]
                items = [(k, v) for k, v in items if v is not None]
                for tier in tiers:
                    tier.put(items)
            finally:
                if lease is not None:
                    l1.complete_get(lease)
            return
        items = [
            (k, v if v is not None else bytes(as_byte_view(b)))
            for k, v, b in zip(keys, views, buffers)
            if v is not None or b is not None
        ]
        try:
            self._queue.put_nowait(_Job(items, tiers, lease))
        except queue.Full:
            if lease is not None:
                l1.complete_get(lease)
            with self._lock:
                self._c.write_behind_dropped += len(keys)
            return
        with self._lock:
            self._c.write_behind_queued += len(keys)

    def _drain(self) -> None:
        while True:
            job = self._queue.get()
            try:
                if job is None:
                    return
                for tier in job.tiers:
                    tier.put(job.items)
            except Exception:  # a tier bug must not kill the writer; tiers report I/O as outcomes
                log.exception("write-behind of %d chunks failed", len(job.items) if job else 0)
                with self._lock:
                    self._c.write_behind_errors += 1
            finally:
                if job is not None and job.lease is not None:
                    self.tiers[0].complete_get(job.lease)
                self._queue.task_done()

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until queued write-behind jobs are written; False if ``timeout`` passed."""
        deadline = time.monotonic() + timeout
        with self._queue.all_tasks_done:
            while self._queue.unfinished_tasks:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._queue.all_tasks_done.wait(left)
        return True

    def delete(self, keys: Sequence[ChunkKey]) -> None:
        """Remove ``keys`` from every tier."""
        for tier in self.tiers:
            tier.delete(keys)

    def evict_prefix(self, prefix: bytes, *, shared: bool = True) -> int:
        """Remove keys starting with ``prefix`` from every tier (shared Redis/S3 tiers too
        unless ``shared=False``); returns the entries removed, summed over tiers."""
        return sum(t.delete_prefix(prefix) for t in self.tiers if shared or not t.capabilities.shared)

    def clear(self, *, shared: bool = False) -> int:
        """Empty this host's tiers (memory, disk); shared tiers only with ``shared=True``."""
        return self.evict_prefix(b"", shared=shared)

    # ---- stats and lifecycle ----------------------------------------------------------

    def stats(self) -> CacheStats:
        with self._lock:
            c = self._c
            counts = dict(
                lookup_tokens=c.lookup_tokens, hit_tokens=c.hit_tokens, promotions=c.promotions,
                not_admitted=c.not_admitted, write_behind_queued=c.write_behind_queued,
                write_behind_dropped=c.write_behind_dropped, write_behind_errors=c.write_behind_errors,
            )  # fmt: skip
        return CacheStats(
            tuple(t.stats() for t in self.tiers), write_behind_pending=self._queue.unfinished_tasks, **counts
        )

    def open_leases(self) -> int:
        """Leases open in any tier (write-behind jobs hold L1 pins until written)."""
        return sum(t.open_leases() for t in self.tiers)

    def _check_open(self) -> None:
        if self._closed:
            raise CacheError("the tiered cache is closed")

    def close(self, timeout: float = 10.0) -> None:
        """Finish queued writes (up to ``timeout``), stop the writer, close every tier."""
        if self._closed:
            return
        self._closed = True
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("write-behind thread still busy after %.1fs; closing tiers anyway", timeout)
        for tier in self.tiers:
            tier.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- construction from a topology ---------------------------------------------------

    @classmethod
    def from_config(
        cls,
        config: CacheConfig,
        chunk_bytes: int,
        *,
        fingerprint: str | LayoutFingerprint | None = None,
        block_size: int | None = None,
        salt: str | bytes | None = None,
        base_dir: str | os.PathLike[str] | None = None,
        source: str | None = None,
        **options: Any,
    ) -> TieredCache:
        """Build the tiers of ``config`` (``cache:`` of a topology), fastest first.

        ``chunk_bytes`` is the size of one chunk (``chunk_tokens`` tokens of KV). With a
        ``fingerprint`` the cache gets a ``keyer`` (``chunk_tokens`` checked against
        ``block_size``). Relative disk paths and ``file:`` secrets are taken relative to
        ``base_dir``; ``source`` names the topology file in errors. ``options`` go to
        ``TieredCache``.
        """
        keyer = None
        if fingerprint is not None:
            keyer = ChunkKeyer.create(fingerprint, config.chunk_tokens, block_size=block_size, salt=salt)
        return cls.from_tiers(config.tiers, chunk_bytes, keyer=keyer, base_dir=base_dir, source=source, **options)

    @classmethod
    def from_tiers(
        cls,
        specs: Sequence[Any],
        chunk_bytes: int,
        *,
        base_dir: str | os.PathLike[str] | None = None,
        source: str | None = None,
        **options: Any,
    ) -> TieredCache:
        """Build from tier config models (``pdfabric.config`` ``MemoryTier``, ``DiskTier``,
        ``RedisTier``, ``S3Tier``), fastest first; see ``from_config``."""
        from pdfabric.config.secrets import resolve_secret

        def path_of(p: str) -> Path:
            q = Path(p).expanduser()
            return Path(base_dir) / q if base_dir is not None and not q.is_absolute() else q

        def secret_of(ref: SecretRef, where: str) -> str:
            return resolve_secret(ref, path=where, source=source, base_dir=base_dir)

        return cls._build(specs, chunk_bytes, path_of, secret_of, options)

    @classmethod
    def from_topology(
        cls,
        topology: Topology,
        chunk_bytes: int,
        *,
        fingerprint: str | LayoutFingerprint | None = None,
        salt: str | bytes | None = None,
        **options: Any,
    ) -> TieredCache:
        """``from_config`` for ``topology.cache``, with its paths, secrets and block size."""
        cfg = topology.cache
        if cfg is None:
            raise CacheError(f"{topology.source or 'the topology'} has no cache: section")
        if fingerprint is not None:
            options["keyer"] = ChunkKeyer.create(
                fingerprint, cfg.chunk_tokens, block_size=topology.model.block_size, salt=salt
            )
        return cls._build(
            cfg.tiers, chunk_bytes, topology.resolve_path,
            lambda ref, where: topology.resolve_secret(ref, path=where), options,
        )  # fmt: skip

    @classmethod
    def _build(
        cls,
        specs: Sequence[Any],
        chunk_bytes: int,
        path_of: Callable[[str], Path],
        secret_of: Callable[[SecretRef, str], str],
        options: dict[str, Any],
    ) -> TieredCache:
        tiers: list[CacheTier] = []
        try:
            for i, spec in enumerate(specs):
                tiers.append(build_tier(spec, chunk_bytes, f"cache.tiers[{i}]", path_of, secret_of))
            return cls(tiers, **options)
        except BaseException:
            for t in tiers:
                t.close()
            raise


def build_tier(
    spec: Any,
    chunk_bytes: int,
    where: str,
    path_of: Callable[[str], Path],
    secret_of: Callable[[SecretRef, str], str],
) -> CacheTier:
    """One tier from its config model (``MemoryTier``/``DiskTier``/``RedisTier``/``S3Tier``
    of ``pdfabric.config``); ``where`` (``cache.tiers[1]``) names it and its errors."""
    if spec.kind == "memory":
        from pdfabric.cache.memory_tier import MemoryTier

        return MemoryTier(spec.size, chunk_bytes, name="memory")
    if spec.kind == "disk":
        from pdfabric.cache.disk_tier import DiskTier

        return DiskTier(path_of(spec.path), spec.size, name="disk", read_threads=spec.read_threads)
    if spec.kind == "redis":
        from pdfabric.cache.redis_tier import RedisTier

        pw = secret_of(spec.password, f"{where}.password") if spec.password is not None else None
        return RedisTier(spec.url, password=pw, ttl_s=spec.ttl_s, name="redis")
    if spec.kind == "s3":
        from pdfabric.cache.s3_tier import S3Tier

        ak = secret_of(spec.access_key, f"{where}.access_key") if spec.access_key is not None else None
        sk = secret_of(spec.secret_key, f"{where}.secret_key") if spec.secret_key is not None else None
        return S3Tier(
            spec.bucket, endpoint=spec.endpoint, prefix=spec.prefix, region=spec.region,
            access_key=ak, secret_key=sk, name="s3",
        )  # fmt: skip
    raise CacheError(f"{where}: unknown cache tier kind {spec.kind!r}")
