"""The receiver's state machine (``transports/_state.py``), driven without sockets.

Connections are plain hashable keys; memory is real numpy buffers registered in a
``MemoryTable``, and writes go through ``MemoryTable.view`` as a transport's receive
loop does. Each test names the module docstring's Rule it checks where there is one.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from pdfabric.errors import (
    FrameError,
    GrantRefused,
    PeerGone,
    RegistrationError,
    TransferAborted,
    TransferTimeout,
    TransportClosed,
)
from pdfabric.memory import Region, RegionArray, merge_columns, region_columns, region_of
from pdfabric.transports._state import MemoryTable, merge_regions
from pdfabric.transports.base import RecvResult, Rejection, Status

from grant_helpers import CONN_A, CONN_B, NAME, PEER, Receiver, segs, wait_in_thread

# ------------------------------------------------------------------ merge_regions / MemoryTable


def test_merge_regions_sorts_merges_overlapping_and_touching_and_drops_empty() -> None:
    regions = [Region(100, 10), Region(0, 10), Region(10, 5), Region(3, 2), Region(50, 0), Region(105, 20)]
    assert merge_regions(regions) == [Region(0, 15), Region(100, 25)]


def test_merge_regions_keeps_gaps() -> None:
    assert merge_regions([Region(0, 4), Region(5, 4)]) == [Region(0, 4), Region(5, 4)]
    assert merge_regions([]) == []


@pytest.mark.parametrize("seed", range(20))
def test_merge_columns_agrees_with_merge_regions(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(0, 40))
    regions = [Region(int(a), int(k)) for a, k in zip(rng.integers(0, 400, n), rng.integers(0, 30, n))]
    starts, ends = merge_columns(*region_columns(regions))
    assert [Region(int(a), int(e - a)) for a, e in zip(starts, ends)] == merge_regions(regions)


def test_grant_of_a_region_array_merges_and_names_bytes_outside_registered_memory() -> None:
    r = Receiver(size=512)
    base = r.base
    r.table.grant("ok", RegionArray([base + 256, base, base + 128], [128, 128, 128]))  # one region after merging
    assert r.table.progress("ok") == (0, 384)
    with pytest.raises(RegistrationError, match=f"grant out: 64 bytes at {base + 512:#x} are outside registered memory"):
        r.table.grant("out", RegionArray([base, base + 512], [64, 64]))
    with pytest.raises(ValueError, match="grant neg: region 1 has address"):
        r.table.grant("neg", [Region(base, 8), Region(base, -8)])


def test_memory_table_merges_overlapping_and_touching_registrations() -> None:
    buf = np.zeros(300, dtype=np.uint8)
    base = region_of(buf).addr
    mem = MemoryTable(NAME)
    mem.add([Region(base, 100)])
    mem.add([Region(base + 100, 50)])  # touching
    mem.add([Region(base + 120, 60)])  # overlapping
    mem.add([Region(base + 250, 50)])  # separate
    assert mem.regions() == [Region(base, 180), Region(base + 250, 50)]
    view = mem.view(base + 90, 20)  # across the touching seam
    view[:] = b"\x07" * 20
    assert buf[90:110].tolist() == [7] * 20 and buf[89] == 0 and buf[110] == 0
    assert mem.contains(base + 175, 5)
    assert not mem.contains(base + 175, 6)


@pytest.mark.parametrize(("off", "length"), [(180, 1), (170, 20), (240, 20), (-1, 2), (299, 2)])
def test_memory_table_view_refuses_unregistered_ranges(off: int, length: int) -> None:
    buf = np.zeros(300, dtype=np.uint8)
    base = region_of(buf).addr
    mem = MemoryTable(NAME)
    mem.add([Region(base, 180), Region(base + 250, 50)])
    with pytest.raises(RegistrationError, match="not inside registered memory") as info:
        mem.view(base + off, length)
    assert f"transport={NAME}" in str(info.value)


def test_memory_table_refuses_empty_regions_and_forgets_on_clear() -> None:
    buf = np.zeros(16, dtype=np.uint8)
    r = region_of(buf)
    mem = MemoryTable(NAME)
    with pytest.raises(RegistrationError, match="empty region"):
        mem.add([Region(r.addr, 0)])
    assert mem.regions() == []
    mem.add([r])
    assert len(mem.view(r.addr, 16)) == 16
    mem.clear()
    assert mem.regions() == []
    with pytest.raises(RegistrationError):
        mem.view(r.addr, 1)


# ------------------------------------------------------------------ grant


def test_grant_outside_registered_memory_is_a_registration_error(rx: Receiver) -> None:
    other = np.zeros(64, dtype=np.uint8)
    for bad in ([region_of(other)], [rx.region(4000, 200)], [rx.region(0, 8), region_of(other)]):
        with pytest.raises(RegistrationError, match="outside registered memory") as info:
            rx.table.grant("t1", bad)
        assert info.value.transfer_id == "t1"
    assert rx.table.pending() == []
    with pytest.raises(TransferAborted):
        rx.table.poll("t1")


def test_duplicate_grant_is_a_value_error(rx: Receiver) -> None:
    rx.table.grant("t1", [rx.region(0, 16)])
    with pytest.raises(ValueError, match="t1 is already granted"):
        rx.table.grant("t1", [rx.region(100, 16)])
    assert rx.table.progress("t1") == (0, 16)


def test_grant_merges_overlapping_regions(rx: Receiver) -> None:
    rx.table.grant("t1", [rx.region(0, 100), rx.region(50, 100), rx.region(150, 10), rx.region(500, 10)])
    assert rx.table.progress("t1") == (0, 170)


def test_tid_can_be_granted_again_after_its_wait_returned(rx: Receiver) -> None:
    rx.table.grant("t1", [rx.region(0, 4)])
    rx.write("t1", 0, b"abcd")
    assert rx.table.stream_end("t1", CONN_A, 4, 1, 4, b"") is None
    assert rx.table.wait("t1", 1.0).nbytes == 4
    rx.table.grant("t1", [rx.region(8, 8)])
    assert rx.table.poll("t1") is Status.PENDING
    assert rx.table.progress("t1") == (0, 8)


# ------------------------------------------------------------------ Rule 1: writes inside the grant


def test_write_inside_grant_lands_and_counts(rx: Receiver) -> None:
    rx.table.grant("t1", [rx.region(10, 6), rx.region(100, 4)])
    rx.write("t1", 10, b"hello!")
    rx.write("t1", 101, b"xyz")
    assert bytes(rx.buf[10:16]) == b"hello!"
    assert bytes(rx.buf[100:104]) == b"\x00xyz"
    assert rx.table.progress("t1") == (9, 10)
    assert rx.table.poll("t1") is Status.PENDING
    assert rx.table.rejections == []


def test_multi_segment_write_across_granted_regions(rx: Receiver) -> None:
    rx.table.grant("t1", [rx.region(0, 8), rx.region(64, 8)])
    token = rx.table.begin_write("t1", segs((rx.base, 8), (rx.base + 64, 8)), PEER, CONN_A)
    rx.table.end_write(token, CONN_A, 16)
    assert rx.table.progress("t1") == (16, 16)


@pytest.mark.parametrize(
    ("off", "length"),
    [(200, 4), (14, 4), (6, 12), (0, 17), (16, 0)],
    ids=["elsewhere", "past-end", "spans-gap", "one-byte-too-many", "empty-at-gap"],
)
def test_write_outside_grant_is_refused_and_fails_the_grant(rx: Receiver, off: int, length: int) -> None:
    rx.table.grant("t1", [rx.region(0, 8), rx.region(17, 8)])
    if length and off + length <= 8:
        pytest.fail("bad parametrization: inside the grant")
    with pytest.raises(GrantRefused, match="outside the grant") as info:
        rx.table.begin_write("t1", segs((rx.base + off, length)), PEER, CONN_A)
    assert info.value.transfer_id == "t1" and info.value.peer == PEER
    assert rx.buf.sum() == 0
    assert rx.table.poll("t1") is Status.FAILED
    (rej,) = rx.table.rejections
    assert rej.transfer_id == "t1" and rej.peer == PEER and "outside the grant" in rej.reason
    with pytest.raises(GrantRefused, match="outside the grant"):
        rx.table.wait("t1", 1.0)


def test_refusal_wakes_a_waiter_at_once(rx: Receiver) -> None:
    rx.table.grant("t1", [rx.region(0, 8)])
    t, out = wait_in_thread(rx.table, "t1")
    with pytest.raises(GrantRefused):
        rx.table.begin_write("t1", segs((rx.base + 8, 1)), PEER, CONN_A)
    t.join(2.0)
    assert isinstance(out.get("error"), GrantRefused)


def test_one_bad_segment_refuses_the_whole_frame(rx: Receiver) -> None:
    rx.table.grant("t1", [rx.region(0, 8)])
    with pytest.raises(GrantRefused):
        rx.table.begin_write("t1", segs((rx.base, 4), (rx.base + 100, 4)), PEER, CONN_A)
    assert rx.table.progress("t1") == (0, 8)
    assert rx.table.poll("t1") is Status.FAILED


@pytest.mark.parametrize("count", [1, 8, 9, 100], ids=lambda n: f"{n}-segments")
def test_many_segment_frames_are_checked_segment_by_segment(rx: Receiver, count: int) -> None:
    # grant every other 8-byte block; a frame writes `count` of them
    rx.table.grant("t1", [rx.region(16 * i, 8) for i in range(count)])
    ok = segs(*((rx.base + 16 * i, 8) for i in range(count)))
    token = rx.table.begin_write("t1", ok, PEER, CONN_A)
    rx.table.end_write(token, CONN_A, 8 * count)
    bad = ok.copy()
    bad[-1, 1] = 9  # the last segment runs one byte into the gap
    with pytest.raises(GrantRefused, match=f"write of 9 bytes at {rx.base + 16 * (count - 1):#x}"):
        rx.table.begin_write("t1", bad, PEER, CONN_A)


def test_segment_length_that_wraps_the_address_space_is_refused(rx: Receiver) -> None:
    rx.table.grant("t1", [rx.region(0, 64)])
    frame = segs(*([(rx.base, 1)] * 8), (rx.base + 8, 2**64 - 1))
    with pytest.raises(GrantRefused, match="outside the grant"):
        rx.table.begin_write("t1", frame, PEER, CONN_A)


def test_unknown_tid_is_refused_and_recorded(rx: Receiver) -> None:
    with pytest.raises(GrantRefused, match="unknown transfer id") as info:
        rx.table.begin_write("ghost", segs((rx.base, 4)), PEER, CONN_A)
    assert info.value.transfer_id == "ghost"
    assert rx.table.rejections == [Rejection("ghost", PEER, "unknown transfer id")]
    assert rx.table.pending() == []


def test_record_counts_refusals_not_tied_to_a_grant(rx: Receiver) -> None:
    rx.table.record(Rejection("", PEER, "bad frame"))
    assert rx.table.rejections == [Rejection("", PEER, "bad frame")]


# ------------------------------------------------------------------ Rule 2: completion


def test_single_stream_completes_with_notify(rx: Receiver) -> None:
    rx.table.grant("t1", [rx.region(0, 8)])
    rx.write("t1", 0, b"12345678")
    assert rx.table.stream_end("t1", CONN_A, 8, 1, 8, b"note") is None
    assert rx.table.poll("t1") is Status.DONE
    result = rx.table.wait("t1", 1.0)
    assert result == RecvResult("t1", 8, b"note")  # type: ignore[arg-type]
    assert rx.table.poll("t1") is Status.DONE  # remembered after the grant is released
    assert rx.table.progress("t1") == (0, 0)


def test_completes_only_when_every_stream_ended(rx: Receiver) -> None:
    rx.table.grant("t1", [rx.region(0, 100)])
    rx.write("t1", 0, b"a" * 60, CONN_A)
    assert rx.table.stream_end("t1", CONN_A, 60, 2, 100, b"") is None
    assert rx.table.poll("t1") is Status.PENDING
    rx.write("t1", 60, b"b" * 40, CONN_B)
    assert rx.table.poll("t1") is Status.PENDING  # all bytes, but stream B has not ended
    assert rx.table.stream_end("t1", CONN_B, 40, 2, 100, b"from-b") is None
    assert rx.table.wait("t1", 1.0) == RecvResult("t1", 100, b"from-b")  # type: ignore[arg-type]
    assert bytes(rx.buf[:100]) == b"a" * 60 + b"b" * 40


def test_a_waiter_is_woken_by_completion(rx: Receiver) -> None:
    rx.table.grant("t1", [rx.region(0, 4)])
    t, out = wait_in_thread(rx.table, "t1")
    rx.write("t1", 0, b"done")
    rx.table.stream_end("t1", CONN_A, 4, 1, 4, b"n")
    t.join(2.0)
    assert out.get("result") == RecvResult("t1", 4, b"n")  # type: ignore[arg-type]


def test_duplicate_end_from_one_stream_does_not_count_twice(rx: Receiver) -> None:
    rx.table.grant("t1", [rx.region(0, 100)])
    rx.write("t1", 0, b"a" * 50, CONN_A)
    assert rx.table.stream_end("t1", CONN_A, 50, 2, 100, b"") is None
    assert rx.table.stream_end("t1", CONN_A, 50, 2, 100, b"") is None
    assert rx.table.poll("t1") is Status.PENDING


def test_stream_lying_about_its_bytes_is_a_frame_error(rx: Receiver) -> None:
    rx.table.grant("t1", [rx.region(0, 8)])
    rx.write("t1", 0, b"1234", CONN_A)
    err = rx.table.stream_end("t1", CONN_A, 8, 1, 8, b"")
    assert isinstance(err, FrameError)
    assert "announced 8 bytes but 4 arrived" in err.message and err.transfer_id == "t1"
    assert rx.table.poll("t1") is Status.FAILED
    with pytest.raises(FrameError) as info:
        rx.table.wait("t1", 1.0)
    assert info.value is err


def test_total_other_than_granted_is_a_frame_error(rx: Receiver) -> None:
    rx.table.grant("t1", [rx.region(0, 8)])
    rx.write("t1", 0, b"1234", CONN_A)
    err = rx.table.stream_end("t1", CONN_A, 4, 1, 4, b"")
    assert isinstance(err, FrameError)
    assert "announced 4 bytes; 8 were granted" in err.message
    with pytest.raises(FrameError):
        rx.table.wait("t1", 1.0)


def test_all_streams_ended_short_of_the_total_is_a_frame_error(rx: Receiver) -> None:
    rx.table.grant("t1", [rx.region(0, 8)])
    rx.write("t1", 0, b"1234", CONN_A)
    err = rx.table.stream_end("t1", CONN_A, 4, 1, 8, b"")
    assert isinstance(err, FrameError)
    assert "ended with 4 of 8 bytes" in err.message
    assert rx.table.poll("t1") is Status.FAILED


def test_stream_end_for_unknown_or_revoked_tid_is_aborted(rx: Receiver) -> None:
    assert isinstance(rx.table.stream_end("ghost", CONN_A, 0, 1, 0, b""), TransferAborted)
    rx.table.grant("t1", [rx.region(0, 4)])
    rx.table.revoke("t1")
    assert isinstance(rx.table.stream_end("t1", CONN_A, 0, 1, 4, b""), TransferAborted)


def test_stream_end_after_failure_returns_the_failure(rx: Receiver) -> None:
    rx.table.grant("t1", [rx.region(0, 4)])
    with pytest.raises(GrantRefused) as info:
        rx.table.begin_write("t1", segs((rx.base + 4, 1)), PEER, CONN_B)
    assert rx.table.stream_end("t1", CONN_A, 0, 2, 4, b"") is info.value


# ------------------------------------------------------------------ Rule 4: finished grants refuse writes


def test_late_write_after_done_is_refused(rx: Receiver) -> None:
    rx.table.grant("t1", [rx.region(0, 4)])
    rx.write("t1", 0, b"abcd")
    rx.table.stream_end("t1", CONN_A, 4, 1, 4, b"")
    with pytest.raises(GrantRefused, match="already done"):
        rx.write("t1", 0, b"late")
    assert bytes(rx.buf[:4]) == b"abcd"
    assert rx.table.wait("t1", 1.0).nbytes == 4  # the refusal does not undo DONE


# ------------------------------------------------------------------ wait / poll / progress


def test_wait_timeout_is_transfer_timeout_and_keeps_the_grant(rx: Receiver) -> None:
    rx.table.grant("t1", [rx.region(0, 8)])
    rx.write("t1", 0, b"abc")
    with pytest.raises(TransferTimeout, match="received 3 of 8 granted bytes") as info:
        rx.table.wait("t1", 0.01)
    assert isinstance(info.value, TimeoutError)
    assert info.value.transfer_id == "t1"
    rx.write("t1", 3, b"defgh")
    rx.table.stream_end("t1", CONN_A, 8, 1, 8, b"")
    assert rx.table.wait("t1", 1.0).nbytes == 8


def test_wait_and_poll_for_unknown_tid_are_aborted(rx: Receiver) -> None:
    with pytest.raises(TransferAborted, match="no grant for transfer"):
        rx.table.wait("ghost", 0.01)
    with pytest.raises(TransferAborted, match="no grant for transfer"):
        rx.table.poll("ghost")


def test_progress_values(rx: Receiver) -> None:
    assert rx.table.progress("t1") == (0, 0)
    rx.table.grant("t1", [rx.region(0, 10), rx.region(20, 5)])
    assert rx.table.progress("t1") == (0, 15)
    rx.write("t1", 0, b"x" * 10)
    assert rx.table.progress("t1") == (10, 15)
    rx.write("t1", 20, b"y" * 5, CONN_B)
    assert rx.table.progress("t1") == (15, 15)
    rx.table.revoke("t1")
    assert rx.table.progress("t1") == (0, 0)


def test_pending_lists_unfinished_grants(rx: Receiver) -> None:
    rx.table.grant("a", [rx.region(0, 4)])
    rx.table.grant("b", [rx.region(4, 4)])
    rx.table.grant("c", [rx.region(8, 4)])
    rx.write("b", 4, b"bbbb")
    rx.table.stream_end("b", CONN_A, 4, 1, 4, b"")
    rx.table.revoke("c")
    assert rx.table.pending() == ["a"]


def test_fail_hands_the_error_to_the_waiter(rx: Receiver) -> None:
    rx.table.grant("t1", [rx.region(0, 4)])
    boom = PeerGone("gone", transfer_id="t1")
    rx.table.fail("t1", boom)
    assert rx.table.poll("t1") is Status.FAILED
    with pytest.raises(PeerGone) as info:
        rx.table.wait("t1", 1.0)
    assert info.value is boom


def test_finished_memory_is_bounded(rx: Receiver) -> None:
    rx.table.grant("first", [rx.region(0, 4)])
    rx.table.revoke("first")
    assert rx.table.poll("first") is Status.ABORTED
    for i in range(4096):
        rx.table.grant(f"t{i}", [rx.region(0, 4)])
        rx.table.revoke(f"t{i}")
    with pytest.raises(TransferAborted, match="no grant"):
        rx.table.poll("first")
    assert rx.table.poll("t4095") is Status.ABORTED


# ------------------------------------------------------------------ Rule 3: lost connections


def test_conn_lost_fails_only_transfers_that_received_bytes_over_it(rx: Receiver) -> None:
    for tid, off in (("over-a", 0), ("over-b", 100), ("idle", 200), ("done-a", 300), ("both", 400)):
        rx.table.grant(tid, [rx.region(off, 8)])
    rx.write("over-a", 0, b"aaaa", CONN_A)
    rx.write("over-b", 100, b"bbbb", CONN_B)
    rx.write("done-a", 300, b"d" * 8, CONN_A)
    rx.table.stream_end("done-a", CONN_A, 8, 1, 8, b"")
    rx.write("both", 400, b"1234", CONN_B)
    rx.write("both", 404, b"5678", CONN_A)

    rx.table.conn_lost(CONN_A, PEER, "reset by peer")

    assert rx.table.poll("over-a") is Status.FAILED
    assert rx.table.poll("both") is Status.FAILED
    assert rx.table.poll("over-b") is Status.PENDING
    assert rx.table.poll("idle") is Status.PENDING
    assert rx.table.wait("done-a", 1.0).nbytes == 8
    with pytest.raises(PeerGone, match="reset by peer") as info:
        rx.table.wait("over-a", 1.0)
    assert info.value.peer == PEER and info.value.transfer_id == "over-a"
    assert f"transport={NAME}" in str(info.value)


def test_conn_lost_wakes_a_waiter(rx: Receiver) -> None:
    rx.table.grant("t1", [rx.region(0, 8)])
    rx.write("t1", 0, b"abc", CONN_A)
    t, out = wait_in_thread(rx.table, "t1")
    rx.table.conn_lost(CONN_A, PEER, "eof")
    t.join(2.0)
    assert isinstance(out.get("error"), PeerGone)


def test_conn_lost_for_an_unknown_conn_changes_nothing(rx: Receiver) -> None:
    rx.table.grant("t1", [rx.region(0, 8)])
    rx.write("t1", 0, b"abc", CONN_A)
    rx.table.conn_lost(object(), PEER, "eof")
    assert rx.table.poll("t1") is Status.PENDING


# ------------------------------------------------------------------ close


def test_close_fails_pending_waits_with_transport_closed(rx: Receiver) -> None:
    rx.table.grant("t1", [rx.region(0, 8)])
    rx.table.grant("t2", [rx.region(8, 8)])
    t, out = wait_in_thread(rx.table, "t1")
    rx.table.close()
    t.join(2.0)
    assert isinstance(out.get("error"), TransportClosed)
    assert rx.table.pending() == []
    assert rx.table.poll("t2") is Status.ABORTED
    with pytest.raises(TransportClosed):
        rx.table.grant("t3", [rx.region(16, 8)])
    with pytest.raises(GrantRefused):
        rx.write("t2", 8, b"late")


def test_close_keeps_finished_results(rx: Receiver) -> None:
    rx.table.grant("t1", [rx.region(0, 4)])
    rx.write("t1", 0, b"abcd")
    rx.table.stream_end("t1", CONN_A, 4, 1, 4, b"kept")
    rx.table.close()
    assert rx.table.wait("t1", 1.0) == RecvResult("t1", 4, b"kept")  # type: ignore[arg-type]




def test_small_grant_checks_agree_with_the_array_check() -> None:
    """Grants of few ranges check a few segments on Python ints; both ways must agree with
    the definition (a segment is inside when one granted range holds all of it)."""
    from pdfabric.transports._state import _Grant, first_outside

    rng = np.random.default_rng(7)
    for trial in range(400):
        n = int(rng.integers(1, 6))
        starts, ends = merge_columns(rng.integers(0, 4000, n).astype(np.uint64), rng.integers(1, 300, n).astype(np.uint64))
        g = _Grant("t", starts, ends, int((ends - starts).sum()))
        assert g.lists is not None
        segs = np.stack([rng.integers(0, 4400, 8), rng.integers(0, 200, 8)], axis=1).astype(np.uint64)
        spans = list(zip(starts.tolist(), ends.tolist()))
        inside = [any(s <= a and a + ln <= e for s, e in spans) for a, ln in segs.tolist()]
        for k in range(1, 9):
            want = next((i for i in range(k) if not inside[i]), -1)  # brute force
            assert g.first_outside(segs[:k]) == want, (trial, k)
            assert first_outside(starts, ends, segs[:k, 0], segs[:k, 1]) == want, (trial, k)


def test_large_grant_checked_a_few_segments_at_a_time_agrees_with_the_definition() -> None:
    """A grant of many ranges (one per KV block) checked one message at a time, as ``ucx``
    does, builds its int lists once on the first such check and stays exact: ranges' edges,
    gaps between them, and segments that straddle two ranges."""
    from pdfabric.transports._state import _LIST_RANGES, _Grant, first_outside

    rng = np.random.default_rng(8)
    n = 4 * _LIST_RANGES
    starts = (np.arange(n, dtype=np.uint64) * np.uint64(1000)) + np.uint64(100)
    ends = starts + rng.integers(100, 900, n).astype(np.uint64)  # gaps between all of them
    g = _Grant("t", starts, ends, int((ends - starts).sum()))
    assert g.lists is None  # nothing converted for grants checked in bulk
    spans = list(zip(starts.tolist(), ends.tolist()))
    for _ in range(600):
        k = int(rng.integers(1, 9))
        segs = np.stack([rng.integers(0, n * 1000, k), rng.integers(1, 1200, k)], axis=1).astype(np.uint64)
        inside = [any(s <= a and a + ln <= e for s, e in spans) for a, ln in segs.tolist()]
        want = next((i for i in range(k) if not inside[i]), -1)
        assert g.first_outside(segs) == want
        assert first_outside(starts, ends, segs[:, 0], segs[:, 1]) == want
    assert g.lists is not None
    edge = np.array([[int(starts[5]), int(ends[5] - starts[5])]], dtype=np.uint64)
    assert g.first_outside(edge) == -1  # exactly one whole range
    assert g.first_outside(edge + np.array([[0, 1]], dtype=np.uint64)) == 0  # one byte past it


# ------------------------------------------------------------------ holds (nixl offers), on_ended, revoke_many


def test_live_hold_and_end_write_of_a_whole_grant(rx: Receiver) -> None:
    rx.table.grant("g", [rx.region(0, 64), rx.region(128, 64)], writer="peer-x")
    token, ranges, writer = rx.table.live("g")  # type: ignore[misc]
    assert ranges.tolist() == [[rx.base, 64], [rx.base + 128, 64]] and writer == "peer-x"
    assert rx.table.hold(token, CONN_A)
    # a hold is an open write: revoke waits for it (drain_s, then the connection is cut)
    cut: list[object] = []
    rx.table._kill_conn = lambda conn: (cut.append(conn), rx.table.end_write(token, conn, 0))  # type: ignore[assignment]
    rx.table.revoke("g")
    assert cut == [CONN_A]
    assert rx.table.live("g") is None and not rx.table.hold(token, CONN_B)  # ended: no new holds


def test_hold_of_a_grant_made_anew_under_the_same_id_is_refused(rx: Receiver) -> None:
    rx.table.grant("g", [rx.region(0, 64)])
    old, _, _ = rx.table.live("g")  # type: ignore[misc]
    rx.table.revoke("g")
    rx.table.grant("g", [rx.region(0, 64)])
    assert not rx.table.hold(old, CONN_A)
    new, _, writer = rx.table.live("g")  # type: ignore[misc]
    assert new is not old and writer is None and rx.table.hold(new, CONN_A)
    rx.table.end_write(new, CONN_A, 0)


def test_on_ended_names_each_grant_that_ends_other_than_done() -> None:
    ended: list[tuple[str, object]] = []
    rx = Receiver()
    rx.table._on_ended = lambda tid, token: ended.append((tid, token))  # type: ignore[assignment]
    for tid in ("done", "revoked", "failed"):
        rx.table.grant(tid, [rx.region(0, 64)] if tid == "done" else [rx.region(64 * (1 + len(ended)), 8)])
    done_token = rx.table.live("done")[0]  # type: ignore[index]
    revoked_token = rx.table.live("revoked")[0]  # type: ignore[index]
    rx.write("done", 0, b"x" * 64)
    assert rx.table.stream_end("done", CONN_A, 64, 1, 64, b"") is None
    rx.table.revoke("revoked")
    with pytest.raises(GrantRefused):
        rx.write("failed", 4000, b"y")  # outside its grant
    assert [t for t, _ in ended] == ["revoked", "failed"]
    assert ended[0][1] is revoked_token and all(tok is not done_token for _, tok in ended)


def test_revoke_many_ends_every_grant_before_draining_any() -> None:
    rx = Receiver(drain_s=0.2)
    tids = [f"l{i}" for i in range(4)]
    tokens = []
    for i, tid in enumerate(tids):
        rx.table.grant(tid, [rx.region(64 * i, 64)])
        tok = rx.table.live(tid)[0]  # type: ignore[index]
        assert rx.table.hold(tok, (CONN_A, i))
        tokens.append(tok)
    ended_before_drain: list[int] = []

    def on_ended(tid: str, token: object) -> None:
        ended_before_drain.append(len(ended_before_drain))
        # answer at once, as a holder does when asked: the drain that follows finds it done
        rx.table.end_write(token, (CONN_A, tids.index(tid)), 0)

    rx.table._on_ended = on_ended  # type: ignore[assignment]
    t0 = time.monotonic()
    rx.table.revoke_many(tids)
    assert len(ended_before_drain) == 4
    assert time.monotonic() - t0 < 0.2, "a drain waited: the holds were not ended first"
    for tid in tids:
        with pytest.raises(TransferAborted):
            rx.table.wait(tid, 0.1)
