"""Byte regions of process memory, and how to get them from buffers.

A ``Region`` is a plain (address, length) pair in *this* process's address space. It is
the unit the layout hands to transports and the unit a receiver grants. Regions never own
memory: whoever created the buffer keeps it alive for as long as a region of it is
registered or granted.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

__all__ = ["Region", "region_of", "view_of", "coalesce_regions", "total_bytes", "contains"]


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
