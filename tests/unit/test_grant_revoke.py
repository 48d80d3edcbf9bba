"""GrantTable: revoke, draining open writes, and handing memory back only when no write is open."""

from __future__ import annotations

import logging
import threading
import time
from typing import Hashable

import pytest

from pdfabric.errors import (
    GrantRefused,
    PeerGone,
    TransferAborted,
)
from pdfabric.transports.base import Status

from grant_helpers import CONN_A, CONN_B, PEER, Receiver, block_until_waiting, segs, wait_in_thread

# ------------------------------------------------------------------ revoke


def test_revoke_wakes_a_waiter_with_transfer_aborted(rx: Receiver) -> None:
    rx.table.grant("t1", [rx.region(0, 8)])
    t, out = wait_in_thread(rx.table, "t1")
    rx.table.revoke("t1")
    t.join(2.0)
    assert not t.is_alive()
    err = out.get("error")
    assert isinstance(err, TransferAborted) and "revoked" in err.message
    assert rx.table.poll("t1") is Status.ABORTED


def test_write_after_revoke_is_refused(rx: Receiver) -> None:
    rx.table.grant("t1", [rx.region(0, 8)])
    rx.table.revoke("t1")
    with pytest.raises(GrantRefused, match="already aborted"):
        rx.write("t1", 0, b"late")
    assert rx.buf.sum() == 0
    assert [r.transfer_id for r in rx.table.rejections] == ["t1"]


def test_revoke_of_unknown_tid_is_a_no_op(rx: Receiver) -> None:
    rx.table.revoke("ghost")
    assert rx.table.pending() == []


def test_revoke_with_no_open_write_does_not_cut_connections() -> None:
    killed: list[Hashable] = []
    r = Receiver(kill_conn=killed.append, drain_s=5.0)
    r.table.grant("t1", [r.region(0, 8)])
    r.write("t1", 0, b"abcd")
    r.table.revoke("t1")  # would take 5 s if it waited for a drain
    assert killed == []


def test_revoke_waits_for_a_write_that_finishes_within_drain() -> None:
    killed: list[Hashable] = []
    r = Receiver(kill_conn=killed.append, drain_s=5.0)
    r.table.grant("t1", [r.region(0, 8)])
    token = r.table.begin_write("t1", segs((r.base, 8)), PEER, CONN_A)
    done = threading.Event()
    revoker = threading.Thread(target=lambda: (r.table.revoke("t1"), done.set()), daemon=True)
    revoker.start()
    block_until_waiting(revoker)
    assert not done.is_set()  # the write is still open
    r.table.end_write(token, CONN_A, 8)
    assert done.wait(2.0)
    assert killed == []


def test_revoke_cuts_the_connection_of_a_stalled_write() -> None:
    drain_s = 0.05
    calls: list[tuple[Hashable, float]] = []
    tokens: dict[Hashable, object] = {}

    def kill_conn(conn: Hashable) -> None:
        calls.append((conn, time.monotonic()))
        r.table.end_write(tokens.pop(conn), conn, 0)  # the cut connection's reader exits

    r = Receiver(kill_conn=kill_conn, drain_s=drain_s)
    r.table.grant("t1", [r.region(0, 8)])
    r.write("t1", 0, b"ab", CONN_B)  # B wrote earlier and is idle: not cut
    tokens[CONN_A] = r.table.begin_write("t1", segs((r.base + 2, 6)), PEER, CONN_A)
    start = time.monotonic()
    r.table.revoke("t1")
    assert [c for c, _ in calls] == [CONN_A]
    assert calls[0][1] - start >= drain_s * 0.9
    assert tokens == {}  # revoke returned only after the write ended
    assert r.table.poll("t1") is Status.ABORTED


def test_revoke_never_returns_while_a_cut_write_is_still_open(caplog: pytest.LogCaptureFixture) -> None:
    """The owner frees the blocks when revoke returns: it must not return while bytes can
    still land. It cuts the writer's connection, logs, and keeps waiting."""
    killed: list[Hashable] = []
    r = Receiver(kill_conn=killed.append, drain_s=0.01)
    r.table.grant("t1", [r.region(0, 8)])
    token = r.table.begin_write("t1", segs((r.base, 8)), PEER, CONN_A)
    done = threading.Event()
    with caplog.at_level(logging.ERROR, logger="pdfabric.transports"):
        th = threading.Thread(target=lambda: (r.table.revoke("t1"), done.set()))
        th.start()
        assert not done.wait(0.3), "revoke returned while a write into the grant was open"
        assert killed == [CONN_A]
        assert any("still open" in rec.getMessage() for rec in caplog.records)
        r.table.end_write(token, CONN_A, 0)  # the cut connection's read finally returns
        assert done.wait(2.0), "revoke did not return after the write ended"
    th.join(2.0)


def test_waiter_woken_by_revoke_does_not_drop_a_new_grant_for_the_same_tid(rx: Receiver) -> None:
    rx.table.grant("t1", [rx.region(0, 8)])
    # Hold the woken waiter between its wake-up and its cleanup, as a slow thread would.
    gate = threading.Event()
    grant = rx.table._grants["t1"]
    real = grant.event

    class GatedEvent:
        def wait(self, timeout: float | None = None) -> bool:
            ok = real.wait(timeout)
            gate.wait(2.0)
            return ok

        def set(self) -> None:
            real.set()

    grant.event = GatedEvent()  # type: ignore[assignment]
    t, out = wait_in_thread(rx.table, "t1")
    rx.table.revoke("t1")
    rx.table.grant("t1", [rx.region(8, 8)])  # the id is reused (e.g. a retried request)
    gate.set()
    t.join(2.0)
    assert isinstance(out.get("error"), TransferAborted)
    assert rx.table.poll("t1") is Status.PENDING
    rx.write("t1", 8, b"newbytes")


def test_failed_grant_is_not_handed_back_while_another_stream_still_writes() -> None:
    """Stream B dies mid-transfer while stream A is inside a write: wait() must not give
    the memory back (raise) until A's write has stopped - it cuts A's connection first."""
    killed: list[Hashable] = []
    r = Receiver(kill_conn=killed.append, drain_s=0.01)
    r.table.grant("t1", [r.region(0, 64)])
    tok_b = r.table.begin_write("t1", segs((r.base, 32)), PEER, CONN_B)
    r.table.end_write(tok_b, CONN_B, 32)
    tok_a = r.table.begin_write("t1", segs((r.base + 32, 32)), PEER, CONN_A)
    r.table.conn_lost(CONN_B, PEER, "reset")
    raised = threading.Event()

    def waiter() -> None:
        with pytest.raises(PeerGone):
            r.table.wait("t1", 5)
        raised.set()

    th = threading.Thread(target=waiter)
    th.start()
    assert not raised.wait(0.3), "wait() returned while stream A was still writing"
    assert killed == [CONN_A]
    r.table.end_write(tok_a, CONN_A, 0)
    assert raised.wait(2.0)
    th.join(2.0)

