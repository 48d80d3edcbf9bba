"""Pure helpers of the stream transports (``coalesce_plan``, ``split_streams``) and the
value types of ``transports/base.py`` (``TransferPlan`` validation, ``TransferHandle``)."""

from __future__ import annotations

import random
import threading
from typing import Iterable, Sequence

import numpy as np
import pytest

from pdfabric.errors import GrantRefused, PeerGone, TransferAborted, TransferTimeout
from pdfabric.memory import Region, RegionArray
from pdfabric.transports._plan import check_no_overlap, coalesce_plan, dest_segments, split_streams
from pdfabric.transports.base import (
    MAX_TRANSFER_ID_BYTES,
    PeerId,
    Status,
    TransferHandle,
    TransferId,
    TransferPlan,
)

Piece = tuple[int, int, int]


def rows(pieces: Iterable[Sequence[int]]) -> list[Piece]:
    """Pieces as plain (src, dst, length) int tuples, whatever container they came in."""
    return [(int(s), int(d), int(n)) for s, d, n in pieces]


def as_pieces(pieces: Sequence[Piece]) -> np.ndarray:
    return np.array(pieces, dtype=np.uint64).reshape(-1, 3)


def plan(*pairs: tuple[int, int, int]) -> TransferPlan:
    """A plan from (src addr, dst addr, length) triples."""
    return TransferPlan.from_pairs("t", [(Region(s, n), Region(d, n)) for s, d, n in pairs])


def byte_map(pieces: Iterable[Piece]) -> list[tuple[int, int]]:
    """(src byte, dst byte) for every byte the pieces move, in order."""
    return [(s + i, d + i) for s, d, n in pieces for i in range(n)]


def size(part: Iterable[Piece]) -> int:
    return sum(n for _, _, n in part)


# ------------------------------------------------------------------ coalesce_plan


def test_pairs_contiguous_on_both_sides_merge() -> None:
    p = plan((1000, 5000, 10), (1010, 5010, 20), (1030, 5030, 5))
    assert rows(coalesce_plan(p)) == [(1000, 5000, 35)]


def test_pairs_contiguous_on_one_side_only_do_not_merge() -> None:
    src_only = plan((1000, 5000, 10), (1010, 9000, 10))
    dst_only = plan((1000, 5000, 10), (3000, 5010, 10))
    assert rows(coalesce_plan(src_only)) == [(1000, 5000, 10), (1010, 9000, 10)]
    assert rows(coalesce_plan(dst_only)) == [(1000, 5000, 10), (3000, 5010, 10)]


def test_coalesce_keeps_plan_order_and_merges_only_neighbours() -> None:
    # the third pair continues the first, but the second sits between them
    p = plan((0, 100, 4), (50, 200, 4), (4, 104, 4), (54, 204, 4))
    assert rows(coalesce_plan(p)) == [(0, 100, 4), (50, 200, 4), (4, 104, 4), (54, 204, 4)]


def test_coalesce_drops_empty_pairs_and_merges_across_them() -> None:
    p = plan((0, 100, 0), (0, 100, 8), (8, 108, 0), (8, 108, 8), (500, 900, 0))
    assert rows(coalesce_plan(p)) == [(0, 100, 16)]


def test_coalesce_of_an_empty_plan() -> None:
    assert rows(coalesce_plan(plan())) == []
    assert rows(coalesce_plan(plan((0, 0, 0)))) == []


def test_coalesce_moves_the_same_bytes_to_the_same_places() -> None:
    rng = random.Random(7)
    triples, s, d = [], 0, 10_000
    for _ in range(200):
        n = rng.randint(0, 16)
        triples.append((s, d, n))
        s += n + rng.choice([0, 0, 3])
        d += n + rng.choice([0, 0, 5])
    p = plan(*triples)
    got = rows(coalesce_plan(p))
    assert byte_map(got) == byte_map(triples)
    assert all(n > 0 for _, _, n in got)
    # nothing left that could still merge
    for (s1, d1, n1), (s2, d2, _) in zip(got, got[1:]):
        assert not (s1 + n1 == s2 and d1 + n1 == d2)


# ------------------------------------------------------------------ split_streams


def random_pieces(seed: int, count: int, max_len: int) -> list[Piece]:
    rng = random.Random(seed)
    out, s, d = [], 0, 1 << 20
    for _ in range(count):
        n = rng.randint(1, max_len)
        out.append((s, d, n))
        s += n + rng.randint(1, 9)  # gaps, so no two pieces could merge
        d += n + rng.randint(1, 9)
    return out


CASES = [
    (seed, count, max_len, k, min_bytes)
    for seed, count, max_len in [(1, 1, 3000), (2, 5, 700), (3, 40, 100), (4, 300, 20)]
    for k, min_bytes in [(1, 1), (2, 1), (3, 1), (4, 100), (8, 1), (16, 50)]
]


@pytest.mark.parametrize(("seed", "count", "max_len", "k", "min_bytes"), CASES)
def test_split_keeps_every_byte_once_in_order(seed: int, count: int, max_len: int, k: int, min_bytes: int) -> None:
    pieces = random_pieces(seed, count, max_len)
    parts = [rows(p) for p in split_streams(as_pieces(pieces), k, min_bytes)]
    # concatenating the parts in order moves exactly the original bytes in the original order
    assert byte_map(p for part in parts for p in part) == byte_map(pieces)
    assert all(part for part in parts)
    assert all(n > 0 for part in parts for _, _, n in part)


@pytest.mark.parametrize(("seed", "count", "max_len", "k", "min_bytes"), CASES)
def test_split_parts_are_within_one_piece_of_equal(seed: int, count: int, max_len: int, k: int, min_bytes: int) -> None:
    pieces = random_pieces(seed, count, max_len)
    total = size(pieces)
    parts = [rows(p) for p in split_streams(as_pieces(pieces), k, min_bytes)]
    assert 1 <= len(parts) <= min(k, max(1, total // min_bytes))
    sizes = [size(p) for p in parts]
    assert sum(sizes) == total
    assert max(sizes) - min(sizes) <= max(n for _, _, n in pieces)


def test_split_uses_k_parts_when_there_is_enough_data() -> None:
    pieces = [(i * 100, 10_000 + i * 100, 64) for i in range(64)]  # 4096 bytes
    parts = [rows(p) for p in split_streams(as_pieces(pieces), 4, 1)]
    assert [size(p) for p in parts] == [1024, 1024, 1024, 1024]


def test_split_cuts_a_large_piece_keeping_src_and_dst_in_step() -> None:
    parts = [rows(p) for p in split_streams(as_pieces([(1000, 50_000, 300)]), 3, 1)]
    assert parts == [[(1000, 50_000, 100)], [(1100, 50_100, 100)], [(1200, 50_200, 100)]]


@pytest.mark.parametrize(("total", "k", "min_bytes"), [(100, 8, 1000), (1999, 4, 1000), (1, 2, 1)])
def test_small_transfers_stay_in_one_part(total: int, k: int, min_bytes: int) -> None:
    pieces = [(0, 500, total)]
    parts = [rows(p) for p in split_streams(as_pieces(pieces), k, min_bytes)]
    assert parts == [pieces]


def test_min_bytes_limits_the_number_of_parts() -> None:
    pieces = [(0, 1 << 30, 5000)]
    parts = split_streams(as_pieces(pieces), 16, 1000)
    assert len(parts) == 5
    assert all(size(rows(p)) == 1000 for p in parts)


def test_one_stream_means_one_part_unchanged() -> None:
    pieces = random_pieces(9, 30, 50)
    parts = split_streams(as_pieces(pieces), 1, 1)
    assert len(parts) == 1 and rows(parts[0]) == pieces


def test_split_of_nothing_moves_nothing() -> None:
    parts = split_streams(as_pieces([]), 4, 1)
    assert sum(size(rows(p)) for p in parts) == 0


@pytest.mark.parametrize(("total", "k", "min_bytes"), [(10, 3, 3), (3 * (1 << 20) + 1, 3, 1 << 20)])
def test_parts_average_at_least_min_bytes(total: int, k: int, min_bytes: int) -> None:
    """The documented contract: k is lowered so parts average >= min_bytes; only the last
    part may be smaller than the others."""
    parts = split_streams(as_pieces([(0, 1 << 32, total)]), k, min_bytes)
    sizes = [size(rows(p)) for p in parts]
    assert len(parts) > 1 and sum(sizes) == total
    assert total / len(parts) >= min_bytes
    assert all(x == sizes[0] for x in sizes[:-1]) and sizes[-1] <= sizes[0]


# ------------------------------------------------------------------ TransferPlan


def test_plan_accepts_equal_pairs_and_counts_bytes() -> None:
    p = TransferPlan.from_pairs("req-1", [(Region(0, 10), Region(100, 10)), (Region(50, 0), Region(7, 0))])
    assert p.transfer_id == "req-1"
    assert p.src == (Region(0, 10), Region(50, 0)) and p.dst == (Region(100, 10), Region(7, 0))
    assert p.nbytes == 10


def test_plan_refuses_pairs_of_unequal_length() -> None:
    with pytest.raises(ValueError, match="pair 1 has source length 8, destination 9") as info:
        TransferPlan.from_pairs("t", [(Region(0, 4), Region(0, 4)), (Region(4, 8), Region(4, 9))])
    assert "plan t" in str(info.value)


def test_plan_refuses_negative_lengths() -> None:
    with pytest.raises(ValueError, match="pair 0"):
        TransferPlan.from_pairs("t", [(Region(0, -1), Region(0, -1))])


def test_plan_refuses_mismatched_counts() -> None:
    with pytest.raises(ValueError, match="2 source regions but 1 destinations"):
        TransferPlan(TransferId("t"), (Region(0, 1), Region(1, 1)), (Region(0, 1),))


@pytest.mark.parametrize("tid", ["", "x" * (MAX_TRANSFER_ID_BYTES + 1), "é" * 65], ids=["empty", "129-ascii", "130-utf8"])
def test_plan_refuses_empty_or_oversized_ids(tid: str) -> None:
    with pytest.raises(ValueError, match=f"transfer id must be 1-{MAX_TRANSFER_ID_BYTES} bytes"):
        TransferPlan.from_pairs(tid, [])


@pytest.mark.parametrize("tid", ["x", "x" * MAX_TRANSFER_ID_BYTES, "é" * 64])
def test_plan_accepts_ids_up_to_the_byte_limit(tid: str) -> None:
    assert TransferPlan.from_pairs(tid, []).transfer_id == tid


def test_plan_is_frozen() -> None:
    p = TransferPlan.from_pairs("t", [])
    with pytest.raises(AttributeError):
        p.transfer_id = TransferId("u")  # type: ignore[misc]


# ------------------------------------------------------------------ TransferHandle


def handle() -> TransferHandle:
    return TransferHandle(TransferId("t1"), PeerId("peer-9"), 1234, "tcp")


def test_handle_resolves_once() -> None:
    h = handle()
    assert h.status is Status.PENDING and h.error is None and h.seconds is None
    err = PeerGone("gone")
    assert h.resolve(Status.FAILED, err) is True
    assert h.resolve(Status.DONE) is False
    assert h.resolve(Status.ABORTED, TransferAborted("x")) is False
    assert h.status is Status.FAILED and h.error is err
    assert h.seconds is not None and h.seconds >= 0


def test_handle_wait_returns_when_done() -> None:
    h = handle()
    h.resolve(Status.DONE)
    h.wait(0)
    h.wait(None)


def test_handle_wait_raises_the_transfer_error() -> None:
    h = handle()
    err = GrantRefused("outside the grant", transfer_id="t1")
    h.resolve(Status.FAILED, err)
    with pytest.raises(GrantRefused) as info:
        h.wait(1.0)
    assert info.value is err


def test_handle_aborted_without_error_raises_transfer_aborted() -> None:
    h = handle()
    h.resolve(Status.ABORTED)
    with pytest.raises(TransferAborted) as info:
        h.wait(1.0)
    assert info.value.transfer_id == "t1" and info.value.peer == "peer-9"


def test_handle_wait_times_out_with_context() -> None:
    h = handle()
    with pytest.raises(TransferTimeout, match="1234 bytes") as info:
        h.wait(0.01)
    assert isinstance(info.value, TimeoutError)
    text = str(info.value)
    assert "transport=tcp" in text and "peer=peer-9" in text and "transfer=t1" in text
    assert h.status is Status.PENDING  # a timeout does not resolve the handle


def test_handle_wakes_a_waiting_thread() -> None:
    h = handle()
    out: list[BaseException | None] = []

    def waiter() -> None:
        try:
            h.wait(5.0)
            out.append(None)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            out.append(e)

    t = threading.Thread(target=waiter, daemon=True)
    t.start()
    h.resolve(Status.DONE)
    t.join(2.0)
    assert out == [None]


def test_concurrent_resolves_have_exactly_one_winner() -> None:
    h = handle()
    barrier = threading.Barrier(8)
    wins: list[bool] = []
    lock = threading.Lock()

    def racer(i: int) -> None:
        barrier.wait()
        won = h.resolve(Status.DONE if i % 2 else Status.FAILED, None if i % 2 else PeerGone(str(i)))
        with lock:
            wins.append(won)

    threads = [threading.Thread(target=racer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(2.0)
    assert sorted(wins) == [False] * 7 + [True]
    assert (h.status is Status.DONE) == (h.error is None)


def test_plan_from_arrays_matches_the_same_plan_from_regions() -> None:
    src, dst, ln = np.array([4096, 8192, 20480]), np.array([0, 4096, 65536]), np.array([4096, 4096, 8192])
    fast = TransferPlan.from_arrays("t", src, dst, ln)
    slow = TransferPlan.from_pairs("t", [(Region(int(s), int(n)), Region(int(d), int(n))) for s, d, n in zip(src, dst, ln)])
    assert fast == slow and fast.nbytes == slow.nbytes == 16384
    assert np.array_equal(coalesce_plan(fast), coalesce_plan(slow))
    assert coalesce_plan(fast).tolist() == [[4096, 0, 8192], [20480, 65536, 8192]]  # first two merge
    assert list(fast.src) == [Region(4096, 4096), Region(8192, 4096), Region(20480, 8192)]
    assert fast.dst[2] == Region(65536, 8192) and fast.dst[1:] == RegionArray([4096, 65536], [4096, 8192])


def test_region_array_is_a_copy_the_caller_cannot_move() -> None:
    addrs = np.array([0, 4096], dtype=np.uint64)
    ra = RegionArray(addrs, [4096, 4096])
    addrs[0] = 999
    assert ra[0] == Region(0, 4096)
    with pytest.raises(ValueError):
        ra.addrs[0] = 5  # read-only


@pytest.mark.parametrize(
    ("addrs", "lengths", "match"),
    [
        ([0, 1], [1], "one length"),
        ([[0]], [[1]], "1-D"),
        ([0.5], [1], "integers"),
        ([0, -4096], [1, 1], "address -4096 at index 1 is negative"),
        ([0], [-1], "length -1 at index 0 is negative"),
    ],
)
def test_region_array_refuses_bad_columns(addrs: list, lengths: list, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        RegionArray(addrs, lengths)


def test_plan_from_arrays_names_the_pair_whose_lengths_differ() -> None:
    with pytest.raises(ValueError, match="pair 1 has source length 8, destination 16"):
        TransferPlan(TransferId("t"), RegionArray([0, 8], [8, 8]), RegionArray([0, 8], [8, 16]))
    with pytest.raises(ValueError, match="2 source regions but 1 destinations"):
        TransferPlan(TransferId("t"), RegionArray([0, 8], [8, 8]), RegionArray([0], [8]))


@pytest.mark.parametrize("n", [1, 8, 9, 40])  # plain-Python checks up to 8 pairs, numpy above
def test_plan_columns_and_errors_are_the_same_for_few_and_many_pairs(n: int) -> None:
    src = [Region(1000 * i, 10 + i) for i in range(n)]
    dst = [Region(7 + 500 * i, 10 + i) for i in range(n)]
    p = TransferPlan(TransferId("t"), tuple(src), tuple(dst))
    assert p.columns.dtype == np.uint64 and p.columns.shape == (n, 3)
    assert p.columns.tolist() == [[s.addr, d.addr, s.length] for s, d in zip(src, dst)]
    assert p.nbytes == sum(s.length for s in src)
    last = n - 1
    bad_len = dst[:last] + [Region(dst[last].addr, 99)]
    with pytest.raises(ValueError, match=f"^plan t: pair {last} has source length {src[last].length}, destination 99$"):
        TransferPlan(TransferId("t"), tuple(src), tuple(bad_len))
    for bad, what in ((Region(-1, 4), "address -1, length 4"), (Region(1 << 64, 4), f"address {1 << 64}, length 4"),
                      (Region(0, -4), "address 0, length -4")):
        with pytest.raises(ValueError, match=f"^plan t: source of pair {last} has {what} \\(out of range\\)$"):
            TransferPlan(TransferId("t"), tuple(src[:last] + [bad]), tuple(dst[:last] + [bad]))


def test_latch_releases_every_waiter_once_set_and_times_out_before() -> None:
    import threading
    import time

    from pdfabric.transports.base import Latch

    latch = Latch()
    t0 = time.monotonic()
    assert latch.wait(0.05) is False and time.monotonic() - t0 >= 0.04 and not latch.is_set()
    assert latch.wait(0) is False
    woken: list[bool] = []
    waiters = [threading.Thread(target=lambda: woken.append(latch.wait(10))) for _ in range(5)]
    for w in waiters:
        w.start()
    latch.set()
    latch.set()  # a second set is a no-op, not an error
    for w in waiters:
        w.join(10)
    assert woken == [True] * 5 and latch.is_set()
    assert latch.wait(0) is True and latch.wait(None) is True


# ------------------------------------------------------------------ dest_segments


def test_dest_segments_sorts_and_merges_touching_destinations() -> None:
    pieces = np.array([[0, 300, 50], [500, 100, 100], [900, 200, 100], [70, 10, 5]], dtype=np.uint64)
    segs = dest_segments(pieces, "t")
    assert segs.dtype == np.uint64 and segs.tolist() == [[10, 5], [100, 250]]
    assert dest_segments(pieces[:1], "t").tolist() == [[300, 50]]


@pytest.mark.parametrize("rows", [[[0, 100, 50], [0, 120, 10]], [[0, 100, 50], [0, 100, 1]], [[0, 7, 1], [0, 0, 8]]])
def test_dest_segments_refuses_what_check_no_overlap_refuses(rows: list[list[int]]) -> None:
    pieces = np.array(rows, dtype=np.uint64)
    with pytest.raises(ValueError, match="written twice") as a:
        dest_segments(pieces, "t")
    with pytest.raises(ValueError, match="written twice") as b:
        check_no_overlap(pieces, "t")
    assert str(a.value) == str(b.value)
