"""Host staging of KV blocks, for transports that cannot reach the KV memory itself.

Theory of operation
-------------------
``tcp``, ``shm`` and ``ucx`` move host memory; a KV cache on a GPU is out of their reach.
With staging, a layer's blocks travel as one contiguous run of host memory:

- producer: per (transfer, layer), ``stage`` gathers the layer's granted blocks into a
  slot of the host pool (on a GPU: the gather kernels into device scratch, then one
  device-to-host copy) and the write reads the slot; the slot is released when the
  write's handle finishes;
- consumer: per transfer, ``reserve`` takes a slot for every layer's blocks and the
  per-layer grants cover the slot, not the KV blocks; the ``Grant`` tells the producer
  the slot's address; as each layer lands, ``land`` scatters it into the KV blocks (one
  host-to-device copy, then the scatter kernel); the slot is released when the transfer
  finishes, whatever its outcome.

Slot order is the kernels' staging order (``pdfabric.kernels`` Rule 1): layer-major, then
segment (K plane, V plane), then block in grant order. ``staged_layout`` describes a slot
as a ``KVLayout`` with ``num_blocks = len(ids)``, so the producer pairs its source with
the consumer's destination through ``pair_columns`` whether either side stages or not.

Each side decides for itself (``staging`` setting): ``auto`` stages exactly when the KV
lives on a device the transport cannot reach; ``always`` stages host KV too (two extra copies:
1.4-2.3x the time of a direct transfer on CPU, ``benchmarks/staging_overhead.py``; it runs
the GPU path's logic on CPU engines); ``never`` refuses to start when the
transport cannot reach the KV. The pool is one buffer of ``staging_bytes`` (page-locked
when the KV is on a GPU), registered with the transport once; a transfer that does not
fit fails at once (the decode engine recomputes the prompt) and is counted.
"""

from __future__ import annotations

import bisect
import dataclasses
import threading
from typing import Any, Literal, Mapping, Sequence

from pdfabric.connector.settings import SOURCE
from pdfabric.errors import ConfigError
from pdfabric.layout import KVLayout
from pdfabric.memory import Region

__all__ = [
    "StagingFull", "StagingMode", "StagingPool", "Stager", "register_memory", "slot_layout", "staging_needed",
    "staged_layout",
]

StagingMode = Literal["auto", "always", "never"]
_ALIGN = 4096


def staging_needed(mode: StagingMode, device: str, transport: Any) -> bool:
    """Whether a worker with KV on ``device`` stages through host memory on ``transport``."""
    reachable = device == "cpu" or bool(transport.capabilities.device_memory)
    if mode == "never" and not reachable:
        raise ConfigError(
            f"the KV cache is on {device} and the {transport.name} transport moves host memory only; "
            "set staging to 'auto' (stage through host memory) or use a transport that reaches device "
            "memory (nixl, cuda_ipc)",
            path="staging", source=SOURCE,
        )
    return mode == "always" or not reachable


class StagingFull(RuntimeError):
    """The host staging pool has no room for a transfer (it fails; decode recomputes)."""


def staged_layout(layout: KVLayout, layer_addrs: Sequence[int], num_ids: int) -> KVLayout:
    """A staging slot as a layout: ``num_ids`` dense blocks per layer, K plane then V plane."""
    g = dataclasses.replace(layout.geometry, num_blocks=num_ids)
    seg = g.segment_bytes
    return KVLayout.from_geometry(
        g, list(layer_addrs), block_stride=seg, segment_stride=num_ids * seg if g.segments_per_block == 2 else 0
    )


def slot_layout(layout: KVLayout, addr: int, num_ids: int) -> KVLayout:
    """A consumer's slot at ``addr`` holding ``num_ids`` blocks of every layer (any side
    can build it from the consumer's layout)."""
    g = layout.geometry
    per = num_ids * g.block_bytes_per_layer
    return staged_layout(layout, [addr + i * per for i in range(g.num_layers)], num_ids)


class StagingPool:
    """One host buffer carved into aligned slots, first fit; thread safe."""

    def __init__(self, nbytes: int, pinned: bool) -> None:
        import torch

        if nbytes <= 0:
            raise ValueError(f"staging pool size must be positive, got {nbytes}")
        self.nbytes = nbytes
        self.tensor = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
        self.base = int(self.tensor.data_ptr())
        self._free: list[tuple[int, int]] = [(0, nbytes)]  # (offset, size), sorted, merged
        self._used: dict[int, int] = {}
        self._lock = threading.Lock()

    def region(self) -> Region:
        return Region(self.base, self.nbytes)

    @property
    def in_use(self) -> int:
        with self._lock:
            return sum(self._used.values())

    def alloc(self, nbytes: int) -> int | None:
        """Offset of a free slot of at least ``nbytes`` bytes, or None when none is left."""
        size = max(_ALIGN, -(-nbytes // _ALIGN) * _ALIGN)
        with self._lock:
            for i, (off, free) in enumerate(self._free):
                if free >= size:
                    if free == size:
                        del self._free[i]
                    else:
                        self._free[i] = (off + size, free - size)
                    self._used[off] = size
                    return off
        return None

    def free(self, offset: int) -> None:
        with self._lock:
            size = self._used.pop(offset)
            i = bisect.bisect(self._free, (offset, 0))
            if i < len(self._free) and offset + size == self._free[i][0]:
                size += self._free.pop(i)[1]
            if i > 0 and self._free[i - 1][0] + self._free[i - 1][1] == offset:
                offset, size = self._free[i - 1][0], self._free[i - 1][1] + size
                i -= 1
                del self._free[i]
            self._free.insert(i, (offset, size))

    def view(self, offset: int, nbytes: int) -> Any:
        return self.tensor[offset : offset + nbytes]


class Stager:
    """A worker's staging: its KV tensors, their layout and the host pool."""

    def __init__(self, layout: KVLayout, tensors: Sequence[Any], pool_bytes: int) -> None:
        self.layout = layout
        self.tensors = list(tensors)
        self.on_gpu = self.tensors[0].device.type == "cuda"
        self.pool = StagingPool(pool_bytes, pinned=self.on_gpu)
        self.block_dim = 1 if layout.geometry.segments_per_block == 2 else 0
        self.engine_thread = threading.current_thread()  # vLLM's worker thread registers the KV
        self.block_bytes = layout.geometry.block_bytes_per_layer
        self.full = 0  # transfers refused for want of room

    def _alloc(self, nbytes: int) -> int:
        off = self.pool.alloc(nbytes)
        if off is None:
            self.full += 1
            raise StagingFull(f"the staging pool ({self.pool.nbytes} bytes, {self.pool.in_use} in use) has no "
                              f"room for {nbytes} bytes; raise staging_bytes")
        return off

    def layer_bytes(self, num_ids: int) -> int:
        return num_ids * self.block_bytes

    # -- producer ----------------------------------------------------------------------
    def stage(self, ids: Sequence[int], layer: int) -> tuple[int, KVLayout]:
        """Gather one layer's ``ids`` into a new slot: (slot offset, the slot's layout for
        ``layer``); ``StagingFull`` when there is no room. The bytes are in place on return."""
        import torch

        from pdfabric.kernels import gather_blocks

        n = len(ids)
        off = self._alloc(self.layer_bytes(n))
        host = self.pool.view(off, self.layer_bytes(n))
        t = self.tensors[layer]
        try:
            if self.on_gpu:
                if threading.current_thread() is not self.engine_thread:
                    torch.cuda.synchronize(t.device)  # the engine's streams wrote this layer
                tmp = gather_blocks([t], list(ids), block_dim=self.block_dim)
                host.copy_(tmp.view(torch.uint8), non_blocking=True)
                torch.cuda.current_stream(t.device).synchronize()
            else:
                gather_blocks([t], list(ids), out=host, block_dim=self.block_dim)
        except BaseException:
            self.pool.free(off)
            raise
        addr = self.pool.base + off
        return off, staged_layout(self.layout, [addr] * self.layout.geometry.num_layers, n)

    # -- consumer ----------------------------------------------------------------------
    def reserve(self, num_ids: int) -> int:
        """A slot for ``num_ids`` blocks of every layer (offset); ``StagingFull`` when full."""
        return self._alloc(self.layer_bytes(num_ids) * self.layout.geometry.num_layers)

    def slot_layout(self, addr: int, num_ids: int) -> KVLayout:
        return slot_layout(self.layout, addr, num_ids)

    def land(self, offset: int, ids: Sequence[int], layer: int) -> None:
        """Scatter one landed layer of the slot at ``offset`` into the KV blocks ``ids``."""
        import torch

        from pdfabric.kernels import scatter_blocks

        per = self.layer_bytes(len(ids))
        host = self.pool.view(offset + layer * per, per)
        t = self.tensors[layer]
        if self.on_gpu:
            dev = host.to(t.device, non_blocking=True)
            scatter_blocks([t], list(ids), dev, block_dim=self.block_dim)
            torch.cuda.current_stream(t.device).synchronize()  # the slot may be reused after this
        else:
            scatter_blocks([t], list(ids), host, block_dim=self.block_dim)

    def release(self, offset: int) -> None:
        self.pool.free(offset)


def register_memory(transport: Any, layout: KVLayout, kv_caches: Mapping[str, Any], mode: StagingMode,
                    pool_bytes: int) -> Stager | None:
    """Register what a worker's writes touch: the KV tensors, or (staging) the host pool.
    Closes ``transport`` when that fails, so a refused start leaves nothing open."""
    try:
        stager = None
        if staging_needed(mode, layout.device, transport):
            stager = Stager(layout, [kv_caches[n] for n in layout.layer_names], pool_bytes)
        transport.register([stager.pool.region()] if stager else layout.registration_regions())
        return stager
    except BaseException:
        transport.close()
        raise
