"""The sender role of the ``nixl`` transport.

A write whose destinations fill a grant the receiver offered us is posted at once, under
the offer's sequence number. Otherwise it Asks the receiver first (destination segments);
while the answer travels, its NIXL transfer is prepared from the cached descriptor lists
(``_nixl_dlists``); on AskOk it is posted - on one host UCX copies it right inside
``transfer()`` (cross-memory attach) - and it is complete when NIXL reports the WRITE done: the receiver approved exactly these
bytes and NIXL's completion says they are in place. AskNo fails it with the receiver's
reason; a Nack after completion (the grant was revoked meanwhile) is logged.
Every method here runs on the transport's NIXL thread.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from pdfabric.errors import (
    ConnectError,
    FrameError,
    GrantRefused,
    PeerGone,
    StalePeer,
    TransferAborted,
    TransportClosed,
    TransportError,
)

from . import _nixl_wire as w
from ._nixl_agent import NIXL_ERRORS, nixl_error, why
from ._nixl_dlists import MEM_NAMES, DlistCache, RegSet, block_indices, granule, map_pieces
from ._nixl_peer import Peer, Write
from .base import Status

if TYPE_CHECKING:
    from ._nixl_agent import AgentThread

__all__ = ["SenderRole", "CODE_ERRORS"]

log = logging.getLogger("pdfabric.transports")

CODE_ERRORS: dict[int, type[TransportError]] = {
    w.Code.REFUSED: GrantRefused,
    w.Code.ABORTED: TransferAborted,
    w.Code.FRAME: FrameError,
    w.Code.STALE: StalePeer,
    w.Code.VERSION: ConnectError,
}


def _fills(offer_segs: bytes, wr: Write) -> bool:
    """True when the write's destinations, merged, are exactly the offered grant."""
    offered = w.unpack_segments(offer_segs)
    return len(wr.pieces) > 0 and offered.shape == wr.dests.shape and bool(np.array_equal(offered, wr.dests))


class SenderRole:
    """Sender handlers; mixed into ``NixlTransport`` (which supplies these)."""

    name: str
    _agent: Any
    _io: "AgentThread"
    _lock: threading.Lock
    _peers: dict[str, Peer]
    _regset: RegSet
    _local_lists: DlistCache
    _inflight: list[Write]
    stats: dict[str, int]

    if TYPE_CHECKING:  # provided by NixlTransport

        def _pump(self) -> bool: ...

        def _send(self, p: Peer, m: Any, raw: bytes = b"") -> bool: ...

        def _flush(self) -> None: ...

        def _ring(self, p: Peer) -> None: ...

        def _drop(self, p: Peer) -> None: ...

    def _ask(self, wr: Write) -> None:
        p = wr.peer
        if not self._io.stopping:
            self._pump()  # its offer, or a Withdraw of the one we hold, may be unread yet
        if self._io.stopping or p.gone is not None:
            err = p.gone or TransportClosed("transport closed", transport=self.name)
            self._finish(wr, type(err)(err.message, transfer_id=wr.handle.transfer_id, peer=p.label, transport=self.name))
            return
        if not p.owes():
            p.last_heard = time.monotonic()  # silence counts from now
        offer = p.offers.get(wr.handle.transfer_id)
        if offer is not None and _fills(offer[1], wr):
            self.stats["offers_used"] += 1
            del p.offers[wr.handle.transfer_id]
            wr.seq, wr.segs = offer  # the Done names the offer and digests its segments
            p.writes[wr.seq] = wr
            self._post_approved(p, wr)
            if wr in self._inflight:  # still moving: the receiver polls for it and watches us
                self._send(p, w.Begin(wr.seq))
            return
        p.writes[wr.seq] = wr
        assert p.regs is not None
        self.stats["asks"] += 1
        if self._send(p, w.Ask(wr.seq, wr.handle.transfer_id, p.regs.epoch, wr.segs)):
            try:  # prepare while the answer travels; posted only after AskOk
                self._prepare(wr)
            except (TransportError, *NIXL_ERRORS):
                self._release_write(wr)  # e.g. memory the peer registered since: after AskOk

    def _on_ask_ok(self, p: Peer, m: w.AskOk) -> None:
        wr = p.writes.get(m.seq)
        if wr is None:
            return
        self._post_approved(p, wr, (m.metadata, m.regions, m.epoch) if m.metadata else None)

    def _on_offer(self, p: Peer, m: w.Offer) -> None:
        try:
            w.unpack_segments(m.segs)
        except FrameError as e:
            log.warning("nixl: malformed offer from %s ignored: %s", p.label, e.message)
            return
        if m.metadata:  # the receiver registered more memory since we last heard
            try:
                self._agent.add_remote_agent(m.metadata)
            except NIXL_ERRORS as e:
                # it believes we know its memory now: take no offers until an AskOk (whose
                # Ask names the epoch we do know) brings its metadata again
                log.warning("nixl: offer from %s with unusable metadata: %s; writes to it ask", p.label, why(e))
                p.offers_ok = False
                p.offers.clear()
                return
            p.regs = RegSet.from_rows(m.regions, m.epoch)
        if p.offers_ok:
            p.offers[m.tid] = (m.seq, m.segs)

    def _on_withdraw(self, p: Peer, m: w.Withdraw) -> None:
        offer = p.offers.get(m.tid)
        if offer is not None and offer[0] == m.seq:
            del p.offers[m.tid]
        if m.seq not in p.writes:  # a write made with it answers with its Done or Cancel
            self._send(p, w.Withdrawn(m.seq))

    def _post_approved(self, p: Peer, wr: Write, learn: tuple[bytes, list, int] | None = None) -> None:  # type: ignore[type-arg]
        """Post a write the receiver approved (AskOk or an offer); a failure cancels it.
        ``learn``: the receiver's new (metadata, regions, epoch), loaded first."""
        try:
            if learn is not None:  # the receiver registered more memory since we last heard
                self._agent.add_remote_agent(learn[0])
                p.regs = RegSet.from_rows(learn[1], learn[2])
                p.offers_ok = True
            self._post(wr)
        except (TransportError, *NIXL_ERRORS) as e:
            err = e if isinstance(e, TransportError) else nixl_error(e, "NIXL refused the write")
            err.transfer_id, err.peer, err.transport = wr.handle.transfer_id, p.label, self.name
            p.writes.pop(wr.seq, None)
            self._release_write(wr)
            self._finish(wr, err)
            self._send(p, w.Cancel(wr.seq, wr.handle.transfer_id, err.message))

    def _prepare(self, wr: Write) -> None:
        """Make the write's NIXL transfer (not posted): its pieces as block indices into the
        prepared lists of both sides, with the Done notification."""
        p, tid = wr.peer, wr.handle.transfer_id
        assert p.regs is not None and p.lists is not None
        done = w.encode(w.Done(wr.seq, tid, wr.handle.nbytes, w.digest(wr.segs), wr.notify))
        if len(wr.pieces) == 0:
            wr.xfer = done  # nothing to move: the Done goes alone
            return
        m = map_pieces(wr.pieces, self._regset, p.regs)
        g = granule(m, self._regset, p.regs)
        loc = self._local_lists.get(self._regset, m.src_kind, g)
        rem = p.lists.get(p.regs, m.dst_kind, g)
        pc = m.pieces
        if loc is not None and rem is not None:
            li = block_indices(loc[1], self._regset, m.src_reg, pc[:, 0], pc[:, 2], g)
            ri = block_indices(rem[1], p.regs, m.dst_reg, pc[:, 1], pc[:, 2], g)
            lh, rh = loc[0], rem[0]
        else:  # lists of every granule would be too long: prepare this write's pieces only
            lrows = np.stack([pc[:, 0], pc[:, 2], self._regset.devs[m.src_reg].astype(np.uint64)], axis=1)
            rrows = np.stack([pc[:, 1], pc[:, 2], p.regs.devs[m.dst_reg].astype(np.uint64)], axis=1)
            lh = self._agent.prep_xfer_dlist("NIXL_INIT_AGENT", lrows, MEM_NAMES[m.src_kind])
            wr.own_lists = (lh,)
            rh = self._agent.prep_xfer_dlist(p.agent, rrows, MEM_NAMES[m.dst_kind])
            wr.own_lists = (lh, rh)
            li = ri = np.arange(len(pc), dtype=np.int32)
        wr.xfer = self._agent.make_prepped_xfer("WRITE", lh, li, rh, ri, done)

    def _post(self, wr: Write) -> None:
        p, tid = wr.peer, wr.handle.transfer_id
        if wr.xfer is None:
            self._prepare(wr)
        if isinstance(wr.xfer, bytes):
            wr.xfer, done = None, wr.xfer
            if self._send(p, None, raw=done):
                self._complete(wr)
            return
        state = self._agent.transfer(wr.xfer)  # CMA (same host) copies right here
        if state == "ERR":
            raise PeerGone("NIXL could not post the write", transfer_id=tid, peer=p.label, transport=self.name)
        if state == "DONE":
            self._complete(wr)  # the bytes are in place: the writer may go on at once
            self._flush()
            self._ring(p)  # its Done notification is there
        else:
            self._inflight.append(wr)

    def _complete(self, wr: Write) -> None:
        """NIXL finished an approved write: every byte is in place (remote completion)."""
        wr.peer.writes.pop(wr.seq, None)
        self._release_write(wr)
        self._finish(wr, None)

    def _check_xfers(self) -> bool:
        changed = False
        for wr in list(self._inflight):
            try:
                state = self._agent.check_xfer_state(wr.xfer)
            except NIXL_ERRORS as e:
                state, reason = "ERR", why(e)
            else:
                reason = "NIXL reported the write failed"
            if state == "PROC":
                continue
            changed = True
            self._inflight.remove(wr)
            self._release_write(wr)
            if state == "DONE":
                self._complete(wr)
                self._flush()
                self._ring(wr.peer)
            elif wr.peer.writes.pop(wr.seq, None) is not None:
                tid = wr.handle.transfer_id
                self._finish(wr, PeerGone(reason, transfer_id=tid, peer=wr.peer.label, transport=self.name))
                self._send(wr.peer, w.Cancel(wr.seq, tid, reason))
            if wr.peer.gone is not None and not any(x.peer is wr.peer for x in self._inflight):
                self._drop(wr.peer)
        if not self._inflight and not any(wr.xfer is not None for p in self._peers.values() for wr in p.writes.values()):
            self._local_lists.release_retired()  # no transfer made from a retired list is left
            for p in self._peers.values():
                if p.lists is not None:
                    p.lists.release_retired()
        return changed

    def _release_write(self, wr: Write) -> None:
        """Release the write's NIXL objects once the transfer is no longer in flight."""
        if wr in self._inflight:
            return
        for h in (wr.xfer, *wr.own_lists):
            if h is not None and not isinstance(h, bytes):
                try:
                    h.release()
                except NIXL_ERRORS as e:
                    log.warning("nixl: releasing a handle failed: %s", why(e))
        wr.xfer, wr.own_lists = None, ()

    def _on_answer(self, p: Peer, m: w.Nack | w.AskNo) -> None:
        wr = p.writes.pop(m.seq, None)
        if wr is None:  # a Nack for a write NIXL already completed (it was revoked meanwhile)
            log.warning("nixl: receiver %s refused write %d after it completed: %s", p.label, m.seq, m.reason)
            return
        self._release_write(wr)
        cls = CODE_ERRORS.get(m.code, TransportError)
        self._finish(wr, cls(f"receiver refused: {m.reason}", transfer_id=wr.handle.transfer_id, peer=p.label, transport=self.name))

    def _finish(self, wr: Write, err: TransportError | None) -> None:
        with self._lock:
            wr.peer.tids.discard(wr.handle.transfer_id)
        wr.handle.resolve(Status.DONE if err is None else Status.FAILED, err)
