"""L1: one preallocated host-memory arena cut into fixed-size chunk slots.

Theory of operation
-------------------
The arena is allocated once (pinned through torch where CUDA is present, so device
copies run at full speed; a numpy array otherwise) and cut into ``num_slots`` slots of
``slot_stride`` bytes (the chunk size rounded up to 4 KiB). Nothing is allocated per
chunk: a put takes a slot from the free list and copies into it, a get copies out of it.

Rule 1 - visibility. A key is in ``_index`` only once its bytes are fully written: a put
reserves a slot (pinned, not indexed), copies outside the lock, then publishes it.

Rule 2 - pins. A slot with a pin count above zero is never evicted or reused: readers
(``get_into`` while copying, ``prepare_get`` until ``complete_get``) and writers hold
pins. Deleting a pinned key unindexes it at once and frees its slot at the last unpin.

Rule 3 - watermarks. When a new entry would take occupancy above ``high_watermark``
(or no slot is free), least-recently-used unpinned entries are evicted until occupancy
is at ``low_watermark``. Eviction only moves slots to the free list.
"""

from __future__ import annotations

import math
import sys
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np

from pdfabric.cache.keys import ChunkKey
from pdfabric.cache.tier import (
    CacheTier,
    GetOutcome,
    GetResult,
    PutOutcome,
    TierCapabilities,
    WriteLease,
    as_byte_view,
)
from pdfabric.units import format_size

__all__ = ["SLOT_ALIGN", "MemoryTier"]

SLOT_ALIGN = 4096


def _allocate(nbytes: int, pin_memory: bool | None) -> tuple[np.ndarray, Any, bool]:
    """(uint8 numpy view of the arena, owning object, pinned?)."""
    torch = sys.modules.get("torch")
    if pin_memory is None:
        pin_memory = torch is not None and bool(torch.cuda.is_available())
    if pin_memory:
        import torch  # imported only when pinning was asked for or torch is already loaded

        owner = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        return owner.numpy(), owner, True
    arr = np.zeros(nbytes, dtype=np.uint8)
    return arr, arr, False


def _slot_stride(chunk_bytes: int) -> int:
    return -(-chunk_bytes // SLOT_ALIGN) * SLOT_ALIGN


class MemoryTier(CacheTier):
    """Fixed-size slots in one arena; LRU with high/low watermarks; pins; zero-copy views.

    ``capacity_bytes // slot_stride`` slots of ``chunk_bytes`` each. ``pin_memory=None``
    pins when torch is already imported and CUDA is available. ``prefault`` touches every
    page up front so the first puts do not pay for page faults. ``arena`` is memory of the
    caller's (e.g. a shared-memory mapping of ``arena_bytes_for(...)`` bytes, as the cache
    server uses) to cut into slots instead of allocating; the caller keeps it alive.
    """

    kind = "memory"
    capabilities = TierCapabilities(zero_copy_views=True, pins=True)

    def __init__(
        self,
        capacity_bytes: int,
        chunk_bytes: int,
        *,
        name: str | None = None,
        high_watermark: float = 0.95,
        low_watermark: float = 0.85,
        pin_memory: bool | None = None,
        prefault: bool = False,
        arena: np.ndarray | None = None,
    ) -> None:
        super().__init__(name)
        if chunk_bytes <= 0:
            raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
        if not 0.0 < low_watermark < high_watermark <= 1.0:
            raise ValueError(
                "expected 0 < low_watermark < high_watermark <= 1, got "
                f"low={low_watermark} high={high_watermark}"
            )
        self.chunk_bytes = chunk_bytes
        self.slot_stride = _slot_stride(chunk_bytes)
        self.num_slots = capacity_bytes // self.slot_stride
        if self.num_slots < 1:
            raise ValueError(
                f"a memory tier of {format_size(capacity_bytes)} holds no chunk of "
                f"{format_size(chunk_bytes)}; give it at least {format_size(self.slot_stride)}"
            )
        n = self.num_slots
        self._high = max(1, math.floor(high_watermark * n))
        self._low = min(math.floor(low_watermark * n), self._high - 1)
        if arena is None:
            arr, self._owner, self.pinned_memory = _allocate(n * self.slot_stride, pin_memory)
        else:
            arr, self._owner, self.pinned_memory = self._adopt(arena, n * self.slot_stride), None, False
        self.arena = arr
        if prefault:
            arr[:: 4096] = 0
        stride, cb = self.slot_stride, chunk_bytes
        self._views = [memoryview(arr[i * stride : i * stride + cb]) for i in range(n)]
        self._lengths = [0] * n
        self._pins = [0] * n
        self._free = list(range(n - 1, -1, -1))
        self._index: OrderedDict[ChunkKey, int] = OrderedDict()
        self._writing: dict[ChunkKey, int] = {}
        self._doomed: set[int] = set()

    @staticmethod
    def arena_bytes_for(capacity_bytes: int, chunk_bytes: int) -> int:
        """Bytes of the arena a tier of ``capacity_bytes`` for ``chunk_bytes`` chunks uses."""
        return capacity_bytes // _slot_stride(chunk_bytes) * _slot_stride(chunk_bytes)

    @staticmethod
    def _adopt(arena: np.ndarray, need: int) -> np.ndarray:
        if arena.dtype != np.uint8 or arena.ndim != 1 or not arena.flags["C_CONTIGUOUS"]:
            raise ValueError(f"arena must be a flat contiguous uint8 array, got {arena.dtype} {arena.shape}")
        if arena.nbytes < need or not arena.flags["WRITEABLE"]:
            raise ValueError(f"arena must be writable and at least {need} bytes, got {arena.nbytes}")
        return arena[:need]

    # ---- slots (caller holds the lock) --------------------------------------------------

    def _release(self, slot: int) -> None:
        self._pins[slot] -= 1
        if self._pins[slot] == 0 and slot in self._doomed:
            self._doomed.discard(slot)
            self._free.append(slot)

    def _evict_to(self, target: int) -> None:
        used = self.num_slots - len(self._free)
        if used <= target:
            return
        victims = []
        for key, slot in self._index.items():
            if self._pins[slot] == 0:
                victims.append(key)
                used -= 1
                if used <= target:
                    break
        for key in victims:
            self._free.append(self._index.pop(key))
        self._counters.evictions += len(victims)

    def _take_slot(self) -> int | None:
        if self.num_slots - len(self._free) >= self._high or not self._free:
            self._evict_to(self._low)
        if not self._free:
            return None
        slot = self._free.pop()
        self._pins[slot] = 1
        return slot

    def _drop_corrupt(self, key: ChunkKey, slot: int) -> None:
        if self._index.get(key) == slot:
            del self._index[key]
            self._doomed.add(slot)
        self._counters.corrupt += 1

    # ---- reads --------------------------------------------------------------------------

    def contains(self, keys: Sequence[ChunkKey]) -> list[bool]:
        index = self._index
        with self._lock:
            return [k in index for k in keys]

    def _pin_slots(self, keys: Sequence[ChunkKey]) -> list[int | None]:
        index, pins = self._index, self._pins
        slots: list[int | None] = []
        with self._lock:
            self._check_open()
            for k in keys:
                s = index.get(k)
                if s is not None:
                    index.move_to_end(k)
                    pins[s] += 1
                slots.append(s)
        return slots

    def _finish_read(self, keys: Sequence[ChunkKey], slots: list[int | None], outs: list[GetOutcome]) -> None:
        c = self._counters
        with self._lock:
            for k, s, o in zip(keys, slots, outs):
                if s is None:
                    c.misses += 1
                    continue
                if o is GetOutcome.HIT:
                    c.hits += 1
                    c.bytes_read += self._lengths[s]
                elif o is GetOutcome.CORRUPT:
                    self._drop_corrupt(k, s)
                self._release(s)

    def get_into(self, keys: Sequence[ChunkKey], buffers: Sequence[Any]) -> list[GetOutcome]:
        if len(buffers) != len(keys):
            raise ValueError(f"get_into: {len(keys)} keys but {len(buffers)} buffers")
        dsts = [as_byte_view(b, writable=True) for b in buffers]
        slots = self._pin_slots(keys)
        views, lengths = self._views, self._lengths
        outs: list[GetOutcome] = []
        try:
            for s, d in zip(slots, dsts):
                if s is None:
                    outs.append(GetOutcome.MISS)
                elif len(d) != lengths[s]:
                    outs.append(GetOutcome.CORRUPT)
                else:
                    d[:] = views[s] if lengths[s] == self.chunk_bytes else views[s][: lengths[s]]
                    outs.append(GetOutcome.HIT)
        finally:
            outs += [GetOutcome.ERROR] * (len(slots) - len(outs))
            self._finish_read(keys, slots, outs)
        return outs

    def get(self, keys: Sequence[ChunkKey]) -> list[GetResult]:
        slots = self._pin_slots(keys)
        results: list[GetResult] = []
        try:
            for s in slots:
                if s is None:
                    results.append(GetResult(GetOutcome.MISS))
                else:
                    data = bytearray(self._views[s][: self._lengths[s]])
                    results.append(GetResult(GetOutcome.HIT, memoryview(data)))
        finally:
            outs = [r.outcome for r in results] + [GetOutcome.ERROR] * (len(slots) - len(results))
            self._finish_read(keys, slots, outs)
        return results

    def _pin(self, keys: Sequence[ChunkKey]) -> tuple[list[GetOutcome], list[memoryview | None], Any]:
        slots = self._pin_slots(keys)
        outs, views = [], []
        with self._lock:
            for s in slots:
                if s is None:
                    self._counters.misses += 1
                    outs.append(GetOutcome.MISS)
                    views.append(None)
                else:
                    self._counters.hits += 1
                    outs.append(GetOutcome.HIT)
                    views.append(self._views[s][: self._lengths[s]].toreadonly())
        return outs, views, [s for s in slots if s is not None]

    def _unpin(self, token: Any) -> None:
        with self._lock:
            for s in token:
                self._release(s)

    # ---- writes -------------------------------------------------------------------------

    def max_value_bytes(self) -> int:
        return self.chunk_bytes

    def _reserve(
        self, keys: Sequence[ChunkKey], sizes: Sequence[int]
    ) -> tuple[list[memoryview | None], list[PutOutcome | None], Any]:
        outs: list[PutOutcome | None] = []
        slots: list[int | None] = []
        with self._lock:
            self._check_open()
            for k, n in zip(keys, sizes):
                slot, out = None, None
                if n > self.chunk_bytes:
                    out = PutOutcome.REJECTED_TOO_LARGE
                    self._counters.rejected += 1
                elif k in self._index or k in self._writing:
                    out = PutOutcome.EXISTS
                    if k in self._index:
                        self._index.move_to_end(k)
                elif (slot := self._take_slot()) is None:
                    out = PutOutcome.NO_SPACE
                    self._counters.rejected += 1
                else:
                    self._writing[k] = slot
                    self._lengths[slot] = n
                outs.append(out)
                slots.append(slot)
        bufs = [None if s is None else self._views[s][:n] for s, n in zip(slots, sizes)]
        return bufs, outs, slots

    def _publish(self, lease: WriteLease, commit: bool, token: Any) -> list[PutOutcome]:
        final: list[PutOutcome] = []
        c = self._counters
        with self._lock:
            for k, slot, out in zip(lease.keys, token, lease.outcomes):
                if slot is None:
                    final.append(out)  # type: ignore[arg-type]
                    continue
                del self._writing[k]
                if commit and not self._closed:
                    self._index[k] = slot
                    c.stores += 1
                    c.bytes_written += self._lengths[slot]
                    final.append(PutOutcome.STORED)
                else:
                    self._doomed.add(slot)
                    final.append(PutOutcome.ABORTED)
                self._release(slot)
        return final

    def put(self, items: Sequence[tuple[ChunkKey, Any]]) -> list[PutOutcome]:
        keys = [k for k, _ in items]
        srcs = [as_byte_view(v) for _, v in items]
        bufs, outs, slots = self._reserve(keys, [len(s) for s in srcs])
        lease = WriteLease(0, self.name, tuple(keys), tuple(bufs), tuple(outs))
        ok = False
        try:
            for b, s in zip(bufs, srcs):
                if b is not None:
                    b[:] = s
            ok = True
        finally:
            final = self._publish(lease, ok, slots)
        return final

    def delete_prefix(self, prefix: bytes) -> int:
        with self._lock:
            return self.delete([k for k in self._index if k.startswith(prefix)])

    def delete(self, keys: Sequence[ChunkKey]) -> int:
        n = 0
        with self._lock:
            for k in keys:
                slot = self._index.pop(k, None)
                if slot is None:
                    continue
                n += 1
                if self._pins[slot]:
                    self._doomed.add(slot)
                else:
                    self._free.append(slot)
        return n

    # ---- stats and lifecycle --------------------------------------------------------------

    def _gauges(self) -> dict[str, int]:
        return {
            "entries": len(self._index),
            "bytes_used": sum(self._lengths[s] for s in self._index.values()),
            "capacity_bytes": self.num_slots * self.chunk_bytes,
            "pinned": sum(1 for p in self._pins if p),
        }

    def close(self) -> None:
        """Forget every entry; the arena is released once no lease view refers to it."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._index.clear()
            self._views = []  # drop our exports of the arena (a caller's mmap can then close)
            self.arena = self._owner = None  # type: ignore[assignment]
