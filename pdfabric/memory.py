"""Byte regions of process memory, and how to get them from buffers.

A ``Region`` is a plain (address, length) pair in *this* process's address space. It is
the unit the layout hands to transports and the unit a receiver grants. Regions never own
memory: whoever created the buffer keeps it alive for as long as a region of it is
registered or granted.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence, overload

import numpy as np

__all__ = ["Region", "RegionArray", "region_columns", "merge_columns", "region_of", "view_of", "coalesce_regions", "total_bytes", "contains"]


@dataclass(frozen=True, slots=True)
class Region:
    """``length`` bytes starting at absolute address ``addr`` of the owning process."""

    addr: int
    length: int

    @property
    def end(self) -> int:
        return self.addr + self.length

    def contains(self, addr: int, length: int) -> bool:
        return self.addr <= addr and addr + length <= self.end



class RegionArray(Sequence[Region]):
    """Many regions as two uint64 columns: a ``Sequence[Region]`` whose plans transports
    read without a Python object per block (``TransferPlan`` takes its columns as they are).

    Build it from whatever computed the addresses (``RegionArray(addrs, lengths)``); the
    columns are copied into read-only arrays, so later changes to the inputs do not move it.
    """

    __slots__ = ("addrs", "lengths")
    addrs: np.ndarray
    lengths: np.ndarray

    def __init__(self, addrs: Any, lengths: Any) -> None:
        a, n = np.asarray(addrs), np.asarray(lengths)
        if a.ndim != 1 or n.shape != a.shape:
            raise ValueError(f"RegionArray needs two 1-D columns of one length, got shapes {a.shape} and {n.shape}")
        for name, col in (("address", a), ("length", n)):
            if col.dtype.kind not in "iu":
                raise ValueError(f"RegionArray {name}es must be integers, got dtype {col.dtype}")
            if col.dtype.kind == "i" and len(col) and int(col.min()) < 0:
                k = int(np.argmin(col))
                raise ValueError(f"RegionArray {name} {int(col[k])} at index {k} is negative")
        self.addrs = a.astype(np.uint64)  # a copy, even when already uint64
        self.lengths = n.astype(np.uint64)
        self.addrs.flags.writeable = False
        self.lengths.flags.writeable = False

    @classmethod
    def of(cls, regions: Iterable[Region]) -> "RegionArray":
        return cls(*region_columns(list(regions)))

    def __len__(self) -> int:
        return len(self.addrs)

    @overload
    def __getitem__(self, i: int) -> Region: ...

    @overload
    def __getitem__(self, i: slice) -> "RegionArray": ...

    def __getitem__(self, i: int | slice) -> "Region | RegionArray":
        if isinstance(i, slice):
            return RegionArray(self.addrs[i], self.lengths[i])
        return Region(int(self.addrs[i]), int(self.lengths[i]))

    def __iter__(self) -> Iterator[Region]:
        return (Region(a, n) for a, n in zip(self.addrs.tolist(), self.lengths.tolist()))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, RegionArray):
            return bool(np.array_equal(self.addrs, other.addrs) and np.array_equal(self.lengths, other.lengths))
        if isinstance(other, Sequence):
            return len(other) == len(self) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    def __hash__(self) -> int:
        return hash((self.addrs.tobytes(), self.lengths.tobytes()))

    def __repr__(self) -> str:
        return f"RegionArray({len(self)} regions, {int(self.lengths.sum())} bytes)"


def region_columns(regions: Sequence[Region], what: str = "region") -> tuple[np.ndarray, np.ndarray]:
    """(addresses, lengths) of regions as uint64 columns - a ``RegionArray``'s own, without a
    copy; ValueError naming the first region (``what`` and its index) whose address or length
    is out of range."""
    if isinstance(regions, RegionArray):
        return regions.addrs, regions.lengths
    addrs = [r.addr for r in regions]
    lengths = [r.length for r in regions]
    try:
        return np.array(addrs, dtype=np.uint64).reshape(-1), np.array(lengths, dtype=np.uint64).reshape(-1)
    except OverflowError:
        i = next(k for k, (a, n) in enumerate(zip(addrs, lengths)) if not (0 <= a < 1 << 64 and 0 <= n < 1 << 64))
        raise ValueError(f"{what} {i} has address {addrs[i]}, length {lengths[i]} (out of range)") from None


def merge_columns(addrs: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted, merged (starts, ends) of the non-empty regions given as columns: overlapping
    or touching regions become one."""
    keep = lengths != 0
    a = addrs[keep]
    order = np.argsort(a, kind="stable")
    a = a[order]
    e = a + lengths[keep][order]
    if len(a) < 2:
        return a, e
    reach = np.maximum.accumulate(e)
    brk = np.ones(len(a), dtype=bool)
    brk[1:] = a[1:] > reach[:-1]
    idx = np.flatnonzero(brk)
    return a[idx], np.maximum.reduceat(e, idx)


def region_of(buf: Any) -> Region:
    """Region covering a contiguous buffer: torch tensor, numpy array, bytearray, mmap,
    or anything exporting the writable buffer protocol."""
    if hasattr(buf, "data_ptr") and hasattr(buf, "element_size"):  # torch.Tensor
        if not buf.is_contiguous():
            raise ValueError("tensor must be contiguous to be used as one region")
        return Region(int(buf.data_ptr()), int(buf.numel() * buf.element_size()))
    if hasattr(buf, "__array_interface__"):  # numpy
        iface = buf.__array_interface__
        if iface["data"][1]:
            raise ValueError("array is read-only; transports need writable memory")
        if iface.get("strides") is not None and not buf.flags["C_CONTIGUOUS"]:
            raise ValueError("array must be C-contiguous to be used as one region")
        return Region(int(iface["data"][0]), int(buf.nbytes))
    mv = memoryview(buf)
    if not mv.contiguous:
        raise ValueError("buffer must be contiguous to be used as one region")
    if mv.readonly:
        raise ValueError("buffer is read-only; transports need writable memory")
    arr = (ctypes.c_char * mv.nbytes).from_buffer(mv)
    return Region(ctypes.addressof(arr), mv.nbytes)


def view_of(region: Region) -> memoryview:
    """A writable memoryview over ``region`` (no copy). The caller keeps the memory alive."""
    if region.length == 0:
        return memoryview(bytearray())
    return memoryview((ctypes.c_char * region.length).from_address(region.addr)).cast("B")


def coalesce_regions(regions: Iterable[Region]) -> list[Region]:
    """Merge regions that follow each other in memory (order kept, adjacency only)."""
    out: list[Region] = []
    for r in regions:
        if r.length == 0:
            continue
        if out and out[-1].end == r.addr:
            last = out[-1]
            out[-1] = Region(last.addr, last.length + r.length)
        else:
            out.append(r)
    return out


def total_bytes(regions: Iterable[Region]) -> int:
    return sum(r.length for r in regions)


def contains(regions: Sequence[Region], addr: int, length: int) -> bool:
    """True when [addr, addr+length) lies inside one of ``regions``."""
    return any(r.contains(addr, length) for r in regions)
