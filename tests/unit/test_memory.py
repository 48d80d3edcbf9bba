"""``pdfabric.memory``: regions of real buffers, views that write through, coalescing."""

from __future__ import annotations

import array
import mmap

import numpy as np
import pytest
import torch

from pdfabric.memory import Region, coalesce_regions, contains, region_of, total_bytes, view_of

# ------------------------------------------------------------------ Region


def test_region_end_and_contains() -> None:
    r = Region(100, 50)
    assert r.end == 150
    assert r.contains(100, 50)
    assert r.contains(120, 10)
    assert r.contains(150, 0)
    assert not r.contains(99, 2)
    assert not r.contains(140, 11)
    assert not r.contains(200, 1)


def test_region_is_frozen_and_hashable() -> None:
    r = Region(1, 2)
    with pytest.raises(AttributeError):
        r.addr = 5  # type: ignore[misc]
    assert {r, Region(1, 2)} == {r}


# ------------------------------------------------------------------ region_of


@pytest.mark.parametrize("dtype", [np.uint8, np.float32, np.float64])
def test_region_of_numpy_array(dtype: type) -> None:
    a = np.zeros((3, 5), dtype=dtype)
    r = region_of(a)
    assert r == Region(a.ctypes.data, a.nbytes)


def test_region_of_numpy_contiguous_slice_starts_at_the_slice() -> None:
    a = np.zeros(100, dtype=np.float32)
    r = region_of(a[10:20])
    assert r == Region(a.ctypes.data + 40, 40)


@pytest.mark.parametrize(
    "make",
    [
        lambda: np.zeros(16, dtype=np.uint8)[::2],
        lambda: np.zeros((4, 4), dtype=np.float32).T,
        lambda: np.zeros((4, 4), dtype=np.float32)[:, :2],
        lambda: np.asfortranarray(np.zeros((3, 4))),
    ],
    ids=["strided", "transposed", "column-slice", "fortran"],
)
def test_region_of_refuses_non_contiguous_numpy(make) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="contiguous"):
        region_of(make())


def test_region_of_refuses_read_only_numpy() -> None:
    a = np.frombuffer(b"immutable bytes!", dtype=np.uint8)
    assert not a.flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        region_of(a)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32, torch.bfloat16])
def test_region_of_torch_tensor(dtype: torch.dtype) -> None:
    t = torch.zeros(3, 7, dtype=dtype)
    r = region_of(t)
    assert r == Region(t.data_ptr(), t.numel() * t.element_size())


def test_region_of_torch_contiguous_slice() -> None:
    t = torch.zeros(10, 4, dtype=torch.float32)
    r = region_of(t[2:5])
    assert r == Region(t.data_ptr() + 2 * 16, 3 * 16)


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.zeros(4, 6).t(),
        lambda: torch.zeros(16)[::2],
        lambda: torch.zeros(4, 6)[:, 1:3],
    ],
    ids=["transposed", "strided", "column-slice"],
)
def test_region_of_refuses_non_contiguous_tensor(make) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="contiguous"):
        region_of(make())


def test_region_of_bytearray() -> None:
    b = bytearray(64)
    r = region_of(b)
    assert r == Region(np.frombuffer(b, dtype=np.uint8).ctypes.data, 64)


def test_region_of_other_writable_buffers() -> None:
    arr = array.array("d", [0.0] * 8)
    assert region_of(arr) == Region(arr.buffer_info()[0], 64)
    m = mmap.mmap(-1, 4096)
    try:
        r = region_of(m)
        assert r.length == 4096
        view_of(r)[:4] = b"mmap"
        assert m[:4] == b"mmap"
    finally:
        m.close()


def test_region_of_bytearray_leaves_it_resizable() -> None:
    b = bytearray(8)
    region_of(b)
    b.extend(b"more")  # BufferError if region_of kept an export alive
    assert len(b) == 12


@pytest.mark.parametrize("buf", [b"read only", memoryview(bytearray(8)).toreadonly()], ids=["bytes", "ro-view"])
def test_region_of_refuses_read_only_buffers(buf: object) -> None:
    with pytest.raises(ValueError, match="read-only") as info:
        region_of(buf)
    assert "writable" in str(info.value)


def test_region_of_refuses_non_contiguous_memoryview() -> None:
    with pytest.raises(ValueError, match="contiguous"):
        region_of(memoryview(bytearray(16))[::2])


def test_region_of_refuses_objects_without_a_buffer() -> None:
    with pytest.raises(TypeError):
        region_of(object())


# ------------------------------------------------------------------ view_of


def test_view_of_numpy_writes_land_in_the_array() -> None:
    a = np.zeros(32, dtype=np.uint8)
    v = view_of(region_of(a))
    assert len(v) == 32 and not v.readonly
    v[4:8] = b"\x01\x02\x03\x04"
    assert a[4:8].tolist() == [1, 2, 3, 4]
    assert a[:4].tolist() == [0, 0, 0, 0] and a[8:].sum() == 0


def test_view_of_sub_region_writes_at_the_offset() -> None:
    a = np.zeros(10, dtype=np.int32)
    base = region_of(a)
    v = view_of(Region(base.addr + 3 * 4, 4))
    v[:] = np.int32(123456).tobytes()
    assert a.tolist() == [0, 0, 0, 123456, 0, 0, 0, 0, 0, 0]


def test_view_of_torch_tensor_writes_and_reads() -> None:
    t = torch.arange(8, dtype=torch.float32)
    v = view_of(region_of(t))
    assert bytes(v) == t.numpy().tobytes()
    v[:4] = np.float32(-2.5).tobytes()
    assert t[0].item() == -2.5


def test_view_of_bytearray_is_no_copy() -> None:
    b = bytearray(b"abcdefgh")
    v = view_of(region_of(b))
    v[0:3] = b"XYZ"
    assert b == bytearray(b"XYZdefgh")
    b[7] = ord("!")
    assert bytes(v) == b"XYZdefg!"


def test_view_of_empty_region() -> None:
    v = view_of(Region(12345, 0))
    assert len(v) == 0


# ------------------------------------------------------------------ coalesce_regions / contains


def test_coalesce_merges_adjacent_regions_in_order() -> None:
    regions = [Region(0, 10), Region(10, 5), Region(15, 1), Region(100, 4), Region(104, 4)]
    assert coalesce_regions(regions) == [Region(0, 16), Region(100, 8)]


def test_coalesce_keeps_order_and_does_not_sort() -> None:
    regions = [Region(10, 5), Region(0, 10)]
    assert coalesce_regions(regions) == [Region(10, 5), Region(0, 10)]


def test_coalesce_drops_empty_regions_and_merges_across_them() -> None:
    regions = [Region(0, 0), Region(0, 8), Region(8, 0), Region(8, 8), Region(50, 0)]
    assert coalesce_regions(regions) == [Region(0, 16)]


def test_coalesce_leaves_gaps_and_overlaps_alone() -> None:
    assert coalesce_regions([Region(0, 8), Region(9, 8)]) == [Region(0, 8), Region(9, 8)]
    assert coalesce_regions([Region(0, 8), Region(4, 8)]) == [Region(0, 8), Region(4, 8)]


def test_coalesce_of_nothing_and_of_a_generator() -> None:
    assert coalesce_regions([]) == []
    assert coalesce_regions(Region(i * 4, 4) for i in range(5)) == [Region(0, 20)]


def test_coalesce_preserves_total_bytes() -> None:
    regions = [Region(0, 3), Region(3, 7), Region(20, 1), Region(21, 2), Region(40, 9)]
    assert total_bytes(coalesce_regions(regions)) == total_bytes(regions) == 22


def test_contains_needs_one_region_to_hold_the_whole_range() -> None:
    regions = [Region(0, 10), Region(10, 10), Region(100, 10)]
    assert contains(regions, 0, 10)
    assert contains(regions, 12, 8)
    assert contains(regions, 105, 5)
    assert not contains(regions, 5, 10)  # spans two regions
    assert not contains(regions, 105, 6)
    assert not contains(regions, 50, 1)
    assert not contains([], 0, 0)
