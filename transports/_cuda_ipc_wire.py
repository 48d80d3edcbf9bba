"""The PULL frame of the ``cuda_ipc`` transport and the receiver's source mapping (no I/O).

``cuda_ipc`` uses the stream transports' frames (``_wire``: HELLO, PULL, END, ACK, ERR); only
the body of its PULL frame is its own, because a receiver can only copy from a sender's GPU
memory after mapping the CUDA IPC handle of the allocation it lives in::

    header      PULL, transfer id, count = copy rows, body_len = payload bytes they move
    body        u8 format | u8 0 | u16 nalloc
                nalloc x (handle 64 B | base u64 | size u64 | device u32)   the allocations
                                                                      the sources lie in
                count x (src u64 | dst u64 | len u64)                 sender's src address,
                                                                      receiver's dst address

Rule 1 (the grant) is checked on ``dst``; ``src`` is mapped through the frame's allocations
(``map_sources``): a source outside every announced allocation is a ``FrameError``, and so
is an announced size larger than what the handle really maps (checked by the receiver when
it opens the handle), so a peer cannot make the receiver's GPU read outside a mapping.

FORMAT history:
  1  first version.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from pdfabric.errors import FrameError

__all__ = ["FORMAT", "Allocation", "map_sources", "pack_pull", "read_pull", "split_rows"]

FORMAT = 1
HANDLE_BYTES = 64  # sizeof(cudaIpcMemHandle_t)
_HEAD = struct.Struct("!BBH")
_ALLOC = struct.Struct(f"!{HANDLE_BYTES}sQQI")
MAX_ALLOCATIONS = 0xFFFF


@dataclass(frozen=True, slots=True)
class Allocation:
    """One device allocation as its owner sees it: [base, base + size) on ``device`` (the
    owner's ordinal), exported as ``handle``."""

    base: int
    size: int
    device: int
    handle: bytes

    @property
    def end(self) -> int:
        return self.base + self.size

    def pack(self) -> bytes:
        return _ALLOC.pack(self.handle, self.base, self.size, self.device)


def pack_pull(allocs: Sequence[bytes], rows: np.ndarray) -> bytes:
    """Body of one PULL frame: packed allocations (``Allocation.pack``), then the (n, 3)
    [src, dst, len] rows."""
    if len(allocs) > MAX_ALLOCATIONS:
        raise ValueError(f"a PULL frame names at most {MAX_ALLOCATIONS} allocations, got {len(allocs)}")
    return _HEAD.pack(FORMAT, 0, len(allocs)) + b"".join(allocs) + np.ascontiguousarray(rows, dtype=">u8").tobytes()


def read_pull(read: Callable[[int], bytes], count: int, body_len: int) -> tuple[list[Allocation], np.ndarray]:
    """Read a PULL body with ``read(n)``; (allocations, (count, 3) uint64 rows).

    FrameError for another format, or rows whose lengths do not add up to ``body_len``."""
    fmt, _, nalloc = _HEAD.unpack(read(_HEAD.size))
    if fmt != FORMAT:
        raise FrameError(f"cuda_ipc PULL frame of format {fmt}; this side reads format {FORMAT} (upgrade both ends)")
    raw = read(_ALLOC.size * nalloc) if nalloc else b""
    allocs = []
    for i in range(nalloc):
        handle, base, size, device = _ALLOC.unpack_from(raw, i * _ALLOC.size)
        allocs.append(Allocation(base, size, device, handle))
    rows = np.frombuffer(read(24 * count), dtype=">u8").reshape(count, 3).astype(np.uint64)
    if sum(rows[:, 2].tolist()) != body_len:  # Python ints: no wrap-around
        raise FrameError(f"PULL frame announces {body_len} bytes but its rows add up differently")
    return allocs, rows


def map_sources(bases: np.ndarray, sizes: np.ndarray, local: np.ndarray, src: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """Sender addresses -> addresses in this process.

    ``bases``/``sizes`` (sorted by base) are the frame's allocations as the sender sees them,
    ``local`` where each is mapped here. Every [src, src + len) must lie inside one
    allocation; FrameError names the first that does not."""
    if len(src) == 0:
        return np.empty(0, dtype=np.uint64)
    i = np.searchsorted(bases, src, side="right").astype(np.int64) - 1
    j = np.maximum(i, 0)
    if len(bases) == 0:
        ok = np.zeros(len(src), dtype=bool)
    else:
        end = bases[j] + sizes[j]
        # lens <= end - src rather than src + lens <= end: uint64 sums could wrap around
        ok = (i >= 0) & (src >= bases[j]) & (src <= end) & (lens <= end - np.minimum(src, end))
    bad = np.flatnonzero(~ok)
    if len(bad):
        k = int(bad[0])
        raise FrameError(
            f"source of {int(lens[k])} bytes at {int(src[k]):#x} is not inside an allocation the frame "
            "announced (the sender's registered device memory)"
        )
    return local[j] + (src - bases[j])


def split_rows(starts: np.ndarray, ends: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sender side: cut (n, 3) [src, dst, len] rows at the ends of the sorted, disjoint
    allocations [starts, ends) (a coalesced row may run across two allocations that
    happen to be adjacent); returns the rows and, per row, the index of the allocation its
    source lies in (-1: in none - the receiver will refuse it)."""
    if len(starts) == 0 or len(rows) == 0:
        return rows, np.full(len(rows), -1, dtype=np.int64)
    src, ln = rows[:, 0], rows[:, 2]
    i = np.searchsorted(starts, src, side="right").astype(np.int64) - 1
    j = np.maximum(i, 0)
    inside = (i >= 0) & (src < ends[j])
    cross = inside & (ln > ends[j] - np.minimum(src, ends[j]))
    if cross.any():
        out: list[list[int]] = []
        e_list = ends.tolist()
        for (s, d, n), c in zip(rows.tolist(), cross.tolist()):
            while c and n:
                k = int(np.searchsorted(starts, s, side="right")) - 1
                if k < 0 or s >= e_list[k]:
                    break
                cut = min(n, e_list[k] - s)
                out.append([s, d, cut])
                s, d, n = s + cut, d + cut, n - cut
            if n:
                out.append([s, d, n])
        return split_rows(starts, ends, np.array(out, dtype=np.uint64).reshape(-1, 3))
    return rows, np.where(inside, i, -1)
