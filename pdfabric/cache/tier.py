"""The interface every cache tier implements, and its value types.

Contract (all tiers)
--------------------
- **Batched, per-key outcomes.** ``contains``, ``get``, ``get_into``, ``put`` and
  ``delete`` take a batch of keys and answer one outcome enum per key, in order. A
  failing backend (Redis down, S3 unreachable, disk error) is an outcome
  (``UNAVAILABLE`` / ``ERROR``), never an exception; exceptions are for caller bugs
  (wrong buffer sizes, a lease completed twice, a closed tier) and are ``ValueError`` or
  ``CacheError``.
- **Bounded time.** Remote tiers answer within their configured timeouts and back off
  (circuit breaker) after a failure; nothing blocks indefinitely.
- **Buffer ownership.** ``put`` reads the caller's buffers before it returns and keeps no
  reference to them. ``get`` returns data the caller owns (a fresh buffer). ``get_into``
  writes into caller buffers, each exactly as long as the stored value; the key fixes
  the chunk geometry, so a stored value of another length is reported ``CORRUPT``.
- **Pins.** ``prepare_get`` pins the keys it found: they are not evicted until
  ``complete_get``. Tiers with ``zero_copy_views`` hand out read-only views of their own
  memory, valid only until ``complete_get``. ``prepare_put`` reserves space and hands out
  writable buffers to fill; ``complete_put`` publishes (or aborts) them. Every lease must
  be completed exactly once; ``open_leases()`` is the leak check.
- **Thread safety.** Every method may be called from any thread concurrently.
- **Lifecycle.** ``close()`` releases memory, files handles, sockets and threads; it is
  idempotent. Tiers are context managers.
"""

from __future__ import annotations

import enum
import itertools
import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any, Self

from pdfabric.cache.keys import ChunkKey
from pdfabric.errors import CacheError

__all__ = [
    "CacheTier",
    "GetOutcome",
    "GetResult",
    "PutOutcome",
    "ReadLease",
    "TierCapabilities",
    "TierStats",
    "WriteLease",
    "as_byte_view",
]


class GetOutcome(enum.Enum):
    """What a tier found for one key."""

    HIT = "hit"
    MISS = "miss"
    CORRUPT = "corrupt"  # stored bytes failed their checksum or length; dropped where possible
    UNAVAILABLE = "unavailable"  # backend down, timed out, or backing off after a failure
    ERROR = "error"  # unexpected local failure (I/O error other than not-found)


class PutOutcome(enum.Enum):
    """What a tier did with one value."""

    STORED = "stored"
    EXISTS = "exists"  # already present (keys name content, so nothing was written)
    REJECTED_TOO_LARGE = "rejected_too_large"  # value larger than the tier's largest value
    NO_SPACE = "no_space"  # nothing evictable (everything pinned) or the device is full
    NOT_ADMITTED = "not_admitted"  # admission policy (e.g. seen only once) said no
    ABORTED = "aborted"  # a reserved write was completed with commit=False
    UNAVAILABLE = "unavailable"
    ERROR = "error"


@dataclass(frozen=True, slots=True)
class GetResult:
    """One key's answer to ``get``: ``data`` is set (and owned by the caller) on HIT."""

    outcome: GetOutcome
    data: memoryview | None = None


@dataclass(frozen=True, slots=True)
class ReadLease:
    """Keys pinned by ``prepare_get``. ``views[i]`` is a read-only view of the tier's own
    memory for a HIT on a ``zero_copy_views`` tier, valid until ``complete_get``."""

    id: int
    tier: str
    keys: tuple[ChunkKey, ...]
    outcomes: tuple[GetOutcome, ...]
    views: tuple[memoryview | None, ...]


@dataclass(frozen=True, slots=True)
class WriteLease:
    """Space reserved by ``prepare_put``. Where ``buffers[i]`` is set, fill it and call
    ``complete_put``; elsewhere ``outcomes[i]`` says why nothing is to be written."""

    id: int
    tier: str
    keys: tuple[ChunkKey, ...]
    buffers: tuple[memoryview | None, ...]
    outcomes: tuple[PutOutcome | None, ...]


@dataclass(frozen=True, slots=True)
class TierCapabilities:
    zero_copy_views: bool = False  # prepare_get hands out views of the tier's memory
    persistent: bool = False  # survives a restart of this process
    shared: bool = False  # other hosts see the same entries
    pins: bool = False  # prepare_get really prevents eviction (remote stores evict on their own)


@dataclass(frozen=True, slots=True)
class TierStats:
    """A snapshot of one tier's counters (monotonic) and gauges."""

    name: str
    kind: str
    hits: int = 0
    misses: int = 0
    corrupt: int = 0
    errors: int = 0
    evictions: int = 0
    stores: int = 0
    rejected: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    entries: int = 0
    bytes_used: int = 0
    capacity_bytes: int = 0
    pinned: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class _Counters:
    """Mutable counters behind ``TierStats``; callers hold the tier's lock."""

    __slots__ = (
        "bytes_read",
        "bytes_written",
        "corrupt",
        "errors",
        "evictions",
        "hits",
        "misses",
        "rejected",
        "stores",
    )  # fmt: skip

    def __init__(self) -> None:
        for name in self.__slots__:
            setattr(self, name, 0)

    def snapshot(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}


def as_byte_view(buf: Any, *, writable: bool = False) -> memoryview:
    """A flat unsigned-byte view of a contiguous buffer (bytes, bytearray, memoryview,
    numpy array; pass ``tensor.numpy()`` for a CPU torch tensor)."""
    mv = buf if isinstance(buf, memoryview) else memoryview(buf)
    if mv.format != "B" or mv.ndim != 1:
        if not mv.c_contiguous:
            raise ValueError("cache buffers must be C-contiguous")
        mv = mv.cast("B")
    if writable and mv.readonly:
        raise ValueError("get_into needs writable destination buffers, got a read-only one")
    return mv


class CacheTier(ABC):
    """One storage tier. See the module docstring for the contract."""

    kind: str = "tier"
    capabilities = TierCapabilities()

    def __init__(self, name: str | None = None) -> None:
        self.name = name or self.kind
        self._lock = threading.RLock()
        self._counters = _Counters()
        self._lease_ids = itertools.count(1)
        self._read_leases: dict[int, tuple[ReadLease, Any]] = {}
        self._write_leases: dict[int, tuple[WriteLease, Any]] = {}
        self._closed = False

    # ---- required -----------------------------------------------------------------

    @abstractmethod
    def contains(self, keys: Sequence[ChunkKey]) -> list[bool]:
        """Whether each key is stored (UNAVAILABLE counts as False)."""

    @abstractmethod
    def get(self, keys: Sequence[ChunkKey]) -> list[GetResult]:
        """Each key's value, as a buffer the caller owns."""

    @abstractmethod
    def get_into(self, keys: Sequence[ChunkKey], buffers: Sequence[Any]) -> list[GetOutcome]:
        """Copy each stored value into ``buffers[i]`` (exactly as long as the value)."""

    @abstractmethod
    def put(self, items: Sequence[tuple[ChunkKey, Any]]) -> list[PutOutcome]:
        """Store ``(key, buffer)`` pairs; an existing key is left as it is (EXISTS)."""

    @abstractmethod
    def delete(self, keys: Sequence[ChunkKey]) -> int:
        """Remove keys (pinned ones too, once unpinned); returns how many were present."""

    @abstractmethod
    def delete_prefix(self, prefix: bytes) -> int:
        """Remove every key starting with ``prefix`` (b"" clears the tier); returns how many.
        Shared tiers remove only keys under their own namespace (Redis/S3 prefix)."""

    def clear(self) -> int:
        """Remove every entry; returns how many."""
        return self.delete_prefix(b"")

    @abstractmethod
    def _gauges(self) -> dict[str, int]:
        """entries, bytes_used, capacity_bytes, pinned (caller holds the lock)."""

    # ---- pins (tiers that can pin override _pin/_unpin) ------------------------------

    def _pin(
        self, keys: Sequence[ChunkKey]
    ) -> tuple[list[GetOutcome], list[memoryview | None], Any]:
        """Pin the keys present: (outcomes, views, a private token for ``_unpin``).
        Default: look them up, pin nothing."""
        found = self.contains(keys)
        outcomes = [GetOutcome.HIT if f else GetOutcome.MISS for f in found]
        return outcomes, [None] * len(keys), None

    def _unpin(self, token: Any) -> None:
        """Undo ``_pin`` (the token is what it returned)."""

    def prepare_get(self, keys: Sequence[ChunkKey]) -> ReadLease:
        """Pin the keys present (they stay until ``complete_get``); see ``ReadLease``."""
        self._check_open()
        outcomes, views, token = self._pin(keys)
        lease = ReadLease(next(self._lease_ids), self.name, tuple(keys), tuple(outcomes), tuple(views))
        with self._lock:
            self._read_leases[lease.id] = (lease, token)
        return lease

    def complete_get(self, lease: ReadLease) -> None:
        """Unpin what ``prepare_get`` pinned; views of the lease are invalid afterwards."""
        with self._lock:
            entry = self._read_leases.get(lease.id)
            if entry is not None and entry[0] is lease:
                del self._read_leases[lease.id]
        if entry is None or entry[0] is not lease:
            raise CacheError(
                f"{self.name}: read lease {lease.id} is not open here (completed twice, "
                "or from another tier)"
            )
        self._unpin(entry[1])

    # ---- two-phase put (memory overrides _reserve/_publish with slots of its own) ------

    def max_value_bytes(self) -> int:
        """The largest value ``put`` accepts."""
        return 2**62

    def _reserve(
        self, keys: Sequence[ChunkKey], sizes: Sequence[int]
    ) -> tuple[list[memoryview | None], list[PutOutcome | None], Any]:
        """Default: staging buffers of our own, written by ``put`` on completion."""
        present = self.contains(keys)
        limit = self.max_value_bytes()
        bufs: list[memoryview | None] = []
        outs: list[PutOutcome | None] = []
        for p, n in zip(present, sizes):
            out = PutOutcome.EXISTS if p else PutOutcome.REJECTED_TOO_LARGE if n > limit else None
            outs.append(out)
            bufs.append(memoryview(bytearray(n)) if out is None else None)
        return bufs, outs, None

    def _publish(self, lease: WriteLease, commit: bool, token: Any) -> list[PutOutcome]:
        ready = [(k, b) for k, b in zip(lease.keys, lease.buffers) if b is not None]
        stored = iter(self.put(ready) if commit and ready else [])
        return [
            o if o is not None else (next(stored) if commit else PutOutcome.ABORTED)
            for o in lease.outcomes
        ]

    def prepare_put(self, keys: Sequence[ChunkKey], sizes: int | Sequence[int]) -> WriteLease:
        """Reserve room for values of ``sizes`` bytes; fill ``lease.buffers`` then complete."""
        self._check_open()
        sizes = [sizes] * len(keys) if isinstance(sizes, int) else list(sizes)
        if len(sizes) != len(keys):
            raise ValueError(f"prepare_put: {len(keys)} keys but {len(sizes)} sizes")
        bufs, outs, token = self._reserve(keys, sizes)
        lease = WriteLease(next(self._lease_ids), self.name, tuple(keys), tuple(bufs), tuple(outs))
        with self._lock:
            self._write_leases[lease.id] = (lease, token)
        return lease

    def complete_put(self, lease: WriteLease, *, commit: bool = True) -> list[PutOutcome]:
        """Publish the filled buffers (``commit``) or give the room back; outcomes per key."""
        with self._lock:
            entry = self._write_leases.get(lease.id)
            if entry is not None and entry[0] is lease:
                del self._write_leases[lease.id]
        if entry is None or entry[0] is not lease:
            raise CacheError(
                f"{self.name}: write lease {lease.id} is not open here (completed twice, "
                "or from another tier)"
            )
        return self._publish(lease, commit, entry[1])

    # ---- stats and lifecycle ----------------------------------------------------------

    def open_leases(self) -> int:
        """Leases prepared and not yet completed (0 after every well-behaved scenario)."""
        with self._lock:
            return len(self._read_leases) + len(self._write_leases)

    def stats(self) -> TierStats:
        with self._lock:
            return TierStats(self.name, self.kind, **self._counters.snapshot(), **self._gauges())

    def _check_open(self) -> None:
        if self._closed:
            raise CacheError(f"{self.name}: the {self.kind} tier is closed")

    def close(self) -> None:
        """Release resources; idempotent."""
        self._closed = True

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"
