"""The cuda_ipc PULL body and source mapping (``transports/_cuda_ipc_wire.py``), no I/O."""

from __future__ import annotations

import io

import numpy as np
import pytest

from pdfabric.errors import FrameError
from pdfabric.transports import _cuda_ipc_wire as cw

U64 = np.uint64


def _rows(*rows: tuple[int, int, int]) -> np.ndarray:
    return np.array(rows, dtype=np.uint64).reshape(-1, 3)


def test_pull_body_round_trip() -> None:
    a = cw.Allocation(0x7000_0000, 1 << 20, 3, bytes(range(64)))
    rows = _rows((0x7000_0000, 0x9000_0000, 4096), (0x7000_2000, 0x9000_8000, 8192))
    body = io.BytesIO(cw.pack_pull([a.pack()], rows))
    allocs, got = cw.read_pull(body.read, 2, 4096 + 8192)
    assert allocs == [a]
    assert got.dtype == np.uint64 and np.array_equal(got, rows)
    assert body.read() == b""


def test_pull_body_of_another_format_or_with_wrong_byte_count_is_a_frame_error() -> None:
    body = cw.pack_pull([], _rows((1, 2, 3)))
    with pytest.raises(FrameError, match="format 9; this side reads format 1"):
        cw.read_pull(io.BytesIO(bytes([9]) + body[1:]).read, 1, 3)
    with pytest.raises(FrameError, match="announces 4 bytes"):
        cw.read_pull(io.BytesIO(body).read, 1, 4)


def test_map_sources_translates_through_the_allocation_that_holds_each_source() -> None:
    bases, sizes = np.array([0x1000, 0x8000], dtype=U64), np.array([0x1000, 0x4000], dtype=U64)
    local = np.array([0xA0000, 0xB0000], dtype=U64)
    got = cw.map_sources(bases, sizes, local, np.array([0x1000, 0x1F00, 0x9000], dtype=U64), np.array([16, 0x100, 0x3000], dtype=U64))
    assert got.tolist() == [0xA0000, 0xA0F00, 0xB1000]


@pytest.mark.parametrize(
    ("src", "length"),
    [
        (0x0800, 16),  # before every allocation
        (0x1F00, 0x101),  # runs past the end of its allocation
        (0x2000, 1),  # in the gap between the two
        (0xC000, 1),  # after the last
        (0x8000, 2**64 - 0x8000),  # src + len wraps around 2**64
    ],
)
def test_map_sources_refuses_a_source_outside_the_announced_allocations(src: int, length: int) -> None:
    bases, sizes = np.array([0x1000, 0x8000], dtype=U64), np.array([0x1000, 0x4000], dtype=U64)
    with pytest.raises(FrameError, match=f"at {src:#x} is not inside an allocation"):
        cw.map_sources(bases, sizes, bases.copy(), np.array([0x1000, src], dtype=U64), np.array([1, length], dtype=U64))


def test_map_sources_with_no_allocation_refuses_every_source() -> None:
    empty = np.empty(0, dtype=U64)
    with pytest.raises(FrameError):
        cw.map_sources(empty, empty, empty, np.array([0x1000], dtype=U64), np.array([1], dtype=U64))
    assert len(cw.map_sources(empty, empty, empty, empty, empty)) == 0


def test_split_rows_cuts_a_row_at_the_end_of_an_allocation() -> None:
    starts, ends = np.array([0x1000, 0x2000], dtype=U64), np.array([0x2000, 0x3000], dtype=U64)
    rows, idx = cw.split_rows(starts, ends, _rows((0x1800, 0x9000, 0x1000), (0x2100, 0xA000, 0x10)))
    assert rows.tolist() == [[0x1800, 0x9000, 0x800], [0x2000, 0x9800, 0x800], [0x2100, 0xA000, 0x10]]
    assert idx.tolist() == [0, 1, 1]


def test_split_rows_leaves_sources_outside_every_allocation_for_the_receiver_to_refuse() -> None:
    starts, ends = np.array([0x1000], dtype=U64), np.array([0x2000], dtype=U64)
    rows, idx = cw.split_rows(starts, ends, _rows((0x1F00, 0x9000, 0x200), (0x5000, 0xA000, 0x10)))
    assert rows.tolist() == [[0x1F00, 0x9000, 0x100], [0x2000, 0x9100, 0x100], [0x5000, 0xA000, 0x10]]
    assert idx.tolist() == [0, -1, -1]
    rows, idx = cw.split_rows(np.empty(0, dtype=U64), np.empty(0, dtype=U64), _rows((1, 2, 3)))
    assert idx.tolist() == [-1]
