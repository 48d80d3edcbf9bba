"""nixl offers: a receiver approves each grant to its peers before they ask (``Offer``), so a
write that fills the grant exactly goes without an Ask and its round trip. What is checked:
the offer is used (no Ask on the wire) and the bytes land; a write that does not fill the
grant still Asks and is refused; a peer that connects after the grant is offered it; a
revoke withdraws unused offers at once (not after the drain timeout); completion
withdraws the offers other peers hold; a peer that leaves without using its offer does
not fail the grant; a grant that names its writer is offered to that peer only; a grant
made anew under the same id is written on its own offer; withdrawing from a peer quiet for
longer than ``peer_timeout_s`` does not declare it gone; ``revoke_many`` withdraws in one
round. (A writer that dies while writing with an offer: ``test_nixl_transport.py``.)"""

from __future__ import annotations

import importlib.util
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from pdfabric.errors import FrameError, GrantRefused
from pdfabric.memory import Region, region_of
from pdfabric.transports import TransferId, TransferPlan, Transport, create

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("nixl") is None,
    reason="nixl is not installed (pip install --no-deps nixl nixl-cu12 nixl-cu13, or the 'nixl' extra)",
)

KiB = 1024
BLOCK = 64 * KiB


class _Sent:
    """Records the type of every control message a transport sends."""

    def __init__(self, t: Any) -> None:
        from pdfabric.transports import _nixl_wire as w

        self.types: list[str] = []
        send = t._send

        def recording(p: Any, m: Any, raw: bytes = b"") -> bool:
            self.types.append(type(m).__name__ if m is not None else type(w.decode(raw)).__name__)
            return send(p, m, raw)

        t._send = recording


@pytest.fixture
def rcv() -> Iterator[tuple[Transport, np.ndarray]]:
    t = create("nixl")
    dst = np.full(16 * BLOCK, 0xA5, dtype=np.uint8)
    t.register([region_of(dst)])
    try:
        yield t, dst
    finally:
        t.close()


def _sender(**options: Any) -> tuple[Transport, np.ndarray]:
    t = create("nixl", **options)
    src = np.random.default_rng(1).integers(0, 256, 16 * BLOCK, dtype=np.uint8)
    t.register([region_of(src)])
    return t, src


def _blocks(buf: np.ndarray, ids: list[int]) -> list[Region]:
    base = region_of(buf).addr
    return [Region(base + i * BLOCK, BLOCK) for i in ids]


def _offers(t: Any) -> dict[str, tuple[int, bytes]]:
    return t._io.call(lambda: {tid: o for p in t._peers.values() for tid, o in p.offers.items()})


def _held(t: Any) -> dict[str, dict[int, Any]]:
    return t._io.call(lambda: {tid: dict(o) for tid, o in t._offers.items()})


def _wait_for(cond: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.002)


def test_a_write_that_fills_an_offered_grant_goes_without_an_ask(rcv) -> None:  # type: ignore[no-untyped-def]
    r, dst = rcv
    s, src = _sender()
    try:
        peer = s.connect(r.descriptor())
        sent = _Sent(s)
        r.grant("g", _blocks(dst, [7, 2, 3, 11]))
        _wait_for(lambda: "g" in _offers(s))
        # the same bytes in another order and cut differently: it still fills the grant exactly
        plan = TransferPlan(TransferId("g"), _blocks(src, [0, 1, 2, 3]), _blocks(dst, [11, 3, 2, 7]))
        s.wait(s.write(peer, plan), 10)
        assert r.wait_recv("g", 10).nbytes == 4 * BLOCK
        assert "Ask" not in sent.types, sent.types  # (the Done rides on the WRITE itself)
        assert s.stats == {"asks": 0, "offers_used": 1}
        for i, j in zip([0, 1, 2, 3], [11, 3, 2, 7]):
            assert np.array_equal(dst[j * BLOCK : (j + 1) * BLOCK], src[i * BLOCK : (i + 1) * BLOCK])
        untouched = [k for k in range(16) if k not in (11, 3, 2, 7)]
        assert all((dst[k * BLOCK : (k + 1) * BLOCK] == 0xA5).all() for k in untouched)
        assert _offers(s) == {} and _held(r) == {}
    finally:
        s.close()


def test_a_write_that_does_not_fill_the_offer_asks_and_is_refused(rcv) -> None:  # type: ignore[no-untyped-def]
    r, dst = rcv
    s, src = _sender()
    try:
        peer = s.connect(r.descriptor())
        sent = _Sent(s)
        r.grant("g", _blocks(dst, [1, 2]))
        _wait_for(lambda: "g" in _offers(s))
        h = s.write(peer, TransferPlan(TransferId("g"), _blocks(src, [0]), _blocks(dst, [1])))
        with pytest.raises((FrameError, GrantRefused)):
            s.wait(h, 10)
        assert "Ask" in sent.types
        assert (dst == 0xA5).all(), "bytes moved for a refused write"
        with pytest.raises((FrameError, GrantRefused)):
            r.wait_recv("g", 5)
        _wait_for(lambda: _held(r) == {} and _offers(s) == {})  # the failed grant withdrew its offer
    finally:
        s.close()


def test_a_peer_that_connects_after_the_grant_is_offered_it(rcv) -> None:  # type: ignore[no-untyped-def]
    r, dst = rcv
    r.grant("early", _blocks(dst, [4]))
    s, src = _sender()
    try:
        sent = _Sent(s)
        peer = s.connect(r.descriptor())
        _wait_for(lambda: "early" in _offers(s))
        s.wait(s.write(peer, TransferPlan(TransferId("early"), _blocks(src, [9]), _blocks(dst, [4]))), 10)
        assert r.wait_recv("early", 10).nbytes == BLOCK
        assert "Ask" not in sent.types, sent.types
    finally:
        s.close()


def test_revoke_withdraws_an_unused_offer_at_once(rcv) -> None:  # type: ignore[no-untyped-def]
    r, dst = rcv
    s, _ = _sender()
    try:
        s.connect(r.descriptor())
        r.grant("g", _blocks(dst, [0, 1]))
        _wait_for(lambda: "g" in _offers(s))
        t0 = time.monotonic()
        r.revoke("g")  # returns once the sender said it will not use the offer
        took = time.monotonic() - t0
        assert took < 0.5, f"revoke took {took:.3f}s: it waited out the drain instead of withdrawing"
        assert _offers(s) == {} and _held(r) == {}
        assert r.rejections == []
    finally:
        s.close()


def test_completion_withdraws_the_offers_other_peers_hold(rcv) -> None:  # type: ignore[no-untyped-def]
    r, dst = rcv
    (a, src), (b, src_b) = _sender(), _sender()
    try:
        pa, pb = a.connect(r.descriptor()), b.connect(r.descriptor())
        r.grant("g", _blocks(dst, [5, 6]))
        _wait_for(lambda: "g" in _offers(a) and "g" in _offers(b))
        assert len(_held(r)["g"]) == 2
        a.wait(a.write(pa, TransferPlan(TransferId("g"), _blocks(src, [0, 1]), _blocks(dst, [5, 6]))), 10)
        assert r.wait_recv("g", 10).nbytes == 2 * BLOCK
        _wait_for(lambda: _offers(b) == {} and _held(r) == {})
        # the grant is done: a late write for it from the other peer Asks and is refused
        with pytest.raises(GrantRefused):
            b.wait(b.write(pb, TransferPlan(TransferId("g"), _blocks(src_b, [2, 3]), _blocks(dst, [5, 6]))), 10)
    finally:
        a.close()
        b.close()


def test_a_peer_that_leaves_without_using_its_offer_leaves_the_grant_to_the_others(rcv) -> None:  # type: ignore[no-untyped-def]
    r, dst = rcv
    (a, src), (b, _) = _sender(), _sender()
    try:
        pa = a.connect(r.descriptor())
        b.connect(r.descriptor())
        r.grant("g", _blocks(dst, [8]))
        _wait_for(lambda: "g" in _offers(a) and "g" in _offers(b))
        b.close()
        _wait_for(lambda: len(_held(r).get("g", {})) == 1)  # b's hold ended with b
        assert r.recv_progress("g") == (0, BLOCK)
        a.wait(a.write(pa, TransferPlan(TransferId("g"), _blocks(src, [3]), _blocks(dst, [8]))), 10)
        assert r.wait_recv("g", 10).nbytes == BLOCK
    finally:
        a.close()
        b.close()


def test_a_grant_naming_its_writer_is_offered_to_that_peer_only(rcv) -> None:  # type: ignore[no-untyped-def]
    r, dst = rcv
    (a, src_a), (b, src_b) = _sender(), _sender()
    try:
        pa, pb = a.connect(r.descriptor()), b.connect(r.descriptor())
        r.grant("for-a", _blocks(dst, [0]), writer=a.descriptor().incarnation)
        r.grant("for-b", _blocks(dst, [1]), writer=b.descriptor().incarnation)
        _wait_for(lambda: "for-a" in _offers(a) and "for-b" in _offers(b))
        assert "for-b" not in _offers(a) and "for-a" not in _offers(b)
        assert {tid: len(o) for tid, o in _held(r).items()} == {"for-a": 1, "for-b": 1}
        a.wait(a.write(pa, TransferPlan(TransferId("for-a"), _blocks(src_a, [0]), _blocks(dst, [0]))), 10)
        # the writer named is who is offered, not who may write: another peer's write Asks
        b.wait(b.write(pb, TransferPlan(TransferId("for-b"), _blocks(src_b, [1]), _blocks(dst, [1]))), 10)
        assert a.stats == {"asks": 0, "offers_used": 1} and b.stats == {"asks": 0, "offers_used": 1}
        r.grant("for-a-again", _blocks(dst, [2]), writer=a.descriptor().incarnation)
        b.wait(b.write(pb, TransferPlan(TransferId("for-a-again"), _blocks(src_b, [2]), _blocks(dst, [2]))), 10)
        assert b.stats["asks"] == 1
        for tid in ("for-a", "for-b", "for-a-again"):
            r.wait_recv(tid, 10)
        _wait_for(lambda: _held(r) == {} and _offers(a) == {})
    finally:
        a.close()
        b.close()


def test_a_grant_made_anew_under_the_same_id_is_written_on_its_own_offer(rcv) -> None:  # type: ignore[no-untyped-def]
    r, dst = rcv
    s, src = _sender()
    try:
        peer = s.connect(r.descriptor())
        for round_ in range(3):
            r.grant("again", _blocks(dst, [3, 4]))
            _wait_for(lambda: "again" in _offers(s))
            plan = TransferPlan(TransferId("again"), _blocks(src, [round_, round_ + 5]), _blocks(dst, [3, 4]))
            s.wait(s.write(peer, plan), 10)
            assert r.wait_recv("again", 10).nbytes == 2 * BLOCK
            assert np.array_equal(dst[3 * BLOCK : 4 * BLOCK], src[round_ * BLOCK : (round_ + 1) * BLOCK])
        assert s.stats == {"asks": 0, "offers_used": 3} and r.rejections == []
    finally:
        s.close()


def test_withdrawing_from_a_long_quiet_peer_does_not_declare_it_gone() -> None:
    r = create("nixl", peer_timeout_s=0.5)
    dst = np.full(4 * BLOCK, 0xA5, dtype=np.uint8)
    r.register([region_of(dst)])
    s, src = _sender()
    try:
        peer = s.connect(r.descriptor())
        time.sleep(1.0)  # quiet for twice the receiver's peer_timeout_s
        r.grant("g", _blocks(dst, [0]))
        _wait_for(lambda: "g" in _offers(s))
        # the sender's answer takes a while (its NIXL thread busy for 0.35 s): the receiver
        # checks liveness meanwhile, with the sender's last word over a second old
        busy = threading.Thread(target=lambda: s._io.call(lambda: time.sleep(0.35)))
        busy.start()
        time.sleep(0.02)
        r.revoke("g")
        busy.join(5)
        time.sleep(0.3)  # liveness checks run every 0.1 s
        assert r._io.call(lambda: [p.gone for p in r._peers.values()]) == [None]
        r.grant("h", _blocks(dst, [1]))
        s.wait(s.write(peer, TransferPlan(TransferId("h"), _blocks(src, [0]), _blocks(dst, [1]))), 10)
        assert r.wait_recv("h", 10).nbytes == BLOCK
    finally:
        s.close()
        r.close()


def test_revoke_many_withdraws_every_offer_in_one_round(rcv) -> None:  # type: ignore[no-untyped-def]
    r, dst = rcv
    s, _ = _sender()
    try:
        s.connect(r.descriptor())
        tids = [f"req#{layer}" for layer in range(16)]
        for layer, tid in enumerate(tids):
            r.grant(tid, _blocks(dst, [layer]))
        _wait_for(lambda: len(_offers(s)) == 16)
        t0 = time.monotonic()
        r.revoke_many(tids)
        took = time.monotonic() - t0
        assert took < 0.5, f"revoke_many of 16 offered grants took {took:.3f}s"
        assert _held(r) == {} and _offers(s) == {} and r.rejections == []
    finally:
        s.close()


def test_an_offer_whose_send_fails_does_not_lose_track_of_the_others(rcv) -> None:  # type: ignore[no-untyped-def]
    from pdfabric.errors import PeerGone
    from pdfabric.transports import _nixl_wire as w

    r, dst = rcv
    (a, _), (b, _) = _sender(), _sender()
    try:
        a.connect(r.descriptor())
        b.connect(r.descriptor())
        dead = a.descriptor().incarnation
        send = r._send

        def failing(p: Any, m: Any, raw: bytes = b"") -> bool:  # a's Offer fails as a send to a dead peer does
            if isinstance(m, w.Offer) and p.incarnation == dead:
                r._gone(p, PeerGone("send failed", peer=p.label, transport="nixl"))
                return False
            return send(p, m, raw)

        r._send = failing
        first = r._io.call(lambda: next(iter(r._peers.values())).incarnation)
        assert first == dead, "the failing peer must be offered first"
        r.grant("g", _blocks(dst, [0]))
        _wait_for(lambda: "g" in _offers(b))
        assert [len(o) for o in _held(r).values()] == [1]  # b's offer, tracked
        t0 = time.monotonic()
        r.revoke("g")
        assert time.monotonic() - t0 < 0.5 and _offers(b) == {} and _held(r) == {}
    finally:
        a.close()
        b.close()
