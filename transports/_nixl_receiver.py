"""The receiver role of the ``nixl`` transport.

A peer writes into our memory only after we approved its Ask or offered it the grant (see
``transports/nixl.py``): ``_on_ask`` checks the destination segments against the grant
table (Rule 1, the same ``GrantTable.begin_write`` tcp and shm run per frame) and
remembers the approval; ``_offer`` approves a whole grant to the peers before they ask;
``_on_done`` matches the WRITE's notification to it - transfer id, byte count and the
digest of the segments - and completes the grant (Rule 2) or reports the violation.
Every method here runs on the transport's NIXL thread, except ``grant`` and ``_kill_conn``.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from pdfabric.errors import FrameError, GrantRefused, TransferAborted
from pdfabric.memory import Region

from . import _nixl_wire as w
from ._nixl_agent import NIXL_ERRORS, as_text, why
from ._nixl_peer import Approval, Peer
from ._state import GrantTable
from .base import Rejection

if TYPE_CHECKING:
    from ._nixl_agent import AgentThread, PidWatch

__all__ = ["ReceiverRole"]


class ReceiverRole:
    """Receiver verbs and handlers; mixed into ``NixlTransport`` (which supplies these)."""

    name: str
    _agent: Any
    _io: "AgentThread"
    _grants: GrantTable
    _incarnation: str
    _peers: dict[str, Peer]
    _pids: "PidWatch"
    _approved_tids: set[str]
    _reg_rows: list[tuple[int, int, int, int]]
    _offers: dict[str, dict[int, Peer]]  # tid -> offer seq -> the peer holding it
    _closed: bool
    _offer_seq: Iterator[int]

    if TYPE_CHECKING:  # provided by NixlTransport

        def _send(self, p: Peer, m: Any, raw: bytes = b"") -> bool: ...

        def _watch(self, p: Peer, pid: int, host_id: str, pidns: str, start: int) -> None: ...

        def _bell_of(self, host_id: str, netns: str, bell: str) -> str: ...

    def grant(self, transfer_id: str, regions: Sequence[Region], writer: str | None = None) -> None:
        super().grant(transfer_id, regions, writer)  # type: ignore[misc]  # GrantReceiver
        self._io.submit(lambda: self._offer(transfer_id))

    # -- offers ---------------------------------------------------------------------------
    def _offer(self, tid: str, peers: list[Peer] | None = None) -> None:
        """Offer the live grant ``tid`` to ``peers`` (default: every peer that said Hello),
        or only to its expected writer when the grant names one: an approval of the whole
        grant, sent before anyone asks. A sender whose write fills the grant exactly
        writes at once, without an Ask and its round trip."""
        live = self._grants.live(tid)
        if live is None:
            return
        token, segs, writer = live
        packed = w.pack_segments(segs)
        for p in list(self._peers.values()) if peers is None else peers:
            if not p.said_hello or p.gone is not None or (writer is not None and p.incarnation != writer):
                continue
            if any(q is p for q in self._offers.get(tid, {}).values()) or not self._grants.hold(token, p):
                continue
            seq = -next(self._offer_seq)
            p.approved[seq] = Approval(tid, token, int(segs[:, 1].sum()), w.digest(packed), offer=True)
            self._offers.setdefault(tid, {})[seq] = p  # looked up again: a failed send below
            epoch = len(self._reg_rows)  # ends the peer, and with it the tid's entry
            moved = p.known_epoch != epoch
            md = self._agent.get_agent_metadata() if moved else b""
            if self._send(p, w.Offer(seq, tid, epoch, md, list(self._reg_rows) if moved else [], packed)):
                p.known_epoch = epoch

    def _forget_offer(self, tid: str, seq: int) -> None:
        offered = self._offers.get(tid)
        if offered is not None:
            offered.pop(seq, None)
            if not offered:
                del self._offers[tid]

    def _retire_offers(self, tid: str) -> None:
        """The grant completed: the offers other peers hold will not be used (one transfer,
        one writer). Their holds end now, so the grant's memory goes back to its owner at
        once, and each peer is told to drop its offer - except an offer a peer said it is
        writing with (Begin): that hold ends with its Done or Cancel."""
        for seq, q in list(self._offers.get(tid, {}).items()):
            a = q.approved.get(seq)
            if a is None:
                continue
            if not a.begun:
                del q.approved[seq]
                self._forget_offer(tid, seq)
                self._grants.end_write(a.token, q, 0)
            elif not a.withdrawing:
                a.withdrawing = True
            else:
                continue
            self._send(q, w.Withdraw(seq, tid))

    def _grant_ended(self, tid: str, token: object) -> None:
        """GrantTable hook (any thread): a grant was revoked, failed or closed. At close the
        Bye and ``_gone`` end every hold, so nothing is sent then."""
        if not self._closed and not self._io.stopping:
            self._io.submit(lambda: self._withdraw_offers(tid, token))

    def _withdraw_offers(self, tid: str, token: object) -> None:
        """Ask every peer holding an offer of the ended grant (``token``: a grant made anew
        under the same id keeps its offers) to drop it. Each hold ends when the peer
        answers Withdrawn (or, for an offer it used, with its Done or Cancel): until then
        the grant's memory is not handed back (``GrantTable._drain``)."""
        now = time.monotonic()
        for seq, q in list(self._offers.get(tid, {}).items()):
            a = q.approved.get(seq)
            if a is not None and a.token is token and not a.withdrawing:
                if not q.owes():
                    q.last_heard = now  # its silence counts from when it owes us an answer
                a.withdrawing = True
                self._send(q, w.Withdraw(seq, tid))

    def _on_withdrawn(self, p: Peer, m: w.Withdrawn) -> None:
        a = p.approved.get(m.seq)
        if a is None or not a.offer:
            return  # retired at completion already
        del p.approved[m.seq]
        self._forget_offer(a.tid, m.seq)
        self._grants.end_write(a.token, p, 0)

    def _on_begin(self, p: Peer, m: w.Begin) -> None:
        a = p.approved.get(m.seq)
        if a is not None and a.offer:
            a.begun = True
            self._approved_tids.add(a.tid)

    def _on_hello(self, agent: str, m: w.Hello) -> None:
        p = self._peers.get(agent)
        if p is None or p.gone is not None:
            try:
                loaded = as_text(self._agent.add_remote_agent(m.metadata))
            except NIXL_ERRORS as e:
                self._grants.record(Rejection("", agent, f"hello with unusable metadata: {why(e)}"))
                return
            if loaded != agent:
                self._grants.record(Rejection("", agent, f"hello carries the metadata of agent {loaded!r}"))
                return
            p = Peer(agent, f"{m.frm[:8]}@pid{m.pid}", time.monotonic(), bell=self._bell_of(m.host_id, m.netns, m.bell))
            self._peers[agent] = p
            self._watch(p, m.pid, m.host_id, m.pidns, m.start)
        if m.version != w.NIXL_WIRE_VERSION:
            self._send(p, w.HelloNo(w.Code.VERSION, f"nixl wire version {m.version}, this side speaks {w.NIXL_WIRE_VERSION}"))
        elif m.to != self._incarnation:
            self._send(p, w.HelloNo(w.Code.STALE, f"hello for incarnation {m.to[:8]}, this transport is {self._incarnation[:8]}"))
        else:
            p.said_hello, p.known_epoch, p.incarnation = True, m.epoch, m.frm
            if self._send(p, w.HelloOk(self._incarnation)):
                for tid in self._grants.pending():  # grants made before it came
                    self._offer(tid, [p])

    def _on_ask(self, p: Peer, m: w.Ask) -> None:
        if not p.said_hello:
            self._grants.record(Rejection(m.tid, p.label, "Ask from an agent that never said hello"))
            self._send(p, w.AskNo(m.seq, w.Code.REFUSED, "say hello first"))
            return
        try:
            segs = w.unpack_segments(m.segs)
            if m.tid in self._approved_tids:
                self._grants.reject(m.tid, p.label, "a write for this transfer is already in flight")
            token = self._grants.begin_write(m.tid, segs, p.label, p)  # Rule 1; GrantRefused
        except (GrantRefused, FrameError) as e:
            if isinstance(e, FrameError):  # GrantTable counted the refusals itself
                self._grants.record(Rejection(m.tid, p.label, e.message))
            self._send(p, w.AskNo(m.seq, w.Code.REFUSED if isinstance(e, GrantRefused) else w.Code.FRAME, e.message))
            return
        nbytes = sum(segs[:, 1].tolist())  # Python ints: no wrap-around
        granted = self._grants.progress(m.tid)[1]
        if nbytes != granted:
            self._grants.end_write(token, p, 0)
            err = FrameError(f"write of {nbytes} bytes; {granted} were granted (a transfer fills its grant exactly)",
                             transfer_id=m.tid, peer=p.label, transport=self.name)  # fmt: skip
            self._grants.fail(m.tid, err)
            self._send(p, w.AskNo(m.seq, w.Code.FRAME, err.message))
            return
        p.approved[m.seq] = Approval(m.tid, token, nbytes, w.digest(m.segs))
        self._approved_tids.add(m.tid)
        epoch = len(self._reg_rows)
        moved = m.epoch != epoch
        md = self._agent.get_agent_metadata() if moved else b""
        if self._send(p, w.AskOk(m.seq, epoch, md, list(self._reg_rows) if moved else [])):
            p.known_epoch = epoch

    def _on_done(self, p: Peer, m: w.Done) -> None:
        """Match a WRITE's notification to its approval: complete the grant, or report."""
        a = p.approved.pop(m.seq, None)
        if a is None:
            reason = f"write {m.seq} for transfer {m.tid} landed without an approval (bytes may be outside the grant)"
        else:
            self._approved_tids.discard(a.tid)
            self._forget_offer(a.tid, m.seq)
            ok = a.tid == m.tid and m.nbytes == a.nbytes and m.digest == a.digest
            self._grants.end_write(a.token, p, a.nbytes if ok else 0)
            if ok:
                self._retire_offers(a.tid)
                err = self._grants.stream_end(a.tid, p, a.nbytes, 1, a.nbytes, m.notify)
                if err is not None:  # the grant ended meanwhile (revoked, failed)
                    code = w.Code.ABORTED if isinstance(err, TransferAborted) else w.Code.FRAME
                    self._send(p, w.Nack(m.seq, code, err.message))
                return
            reason = f"write {m.seq} moved {m.nbytes} bytes to other segments than the {a.nbytes} approved for {a.tid}"
            if a.tid != m.tid:
                self._violation(a.tid, p, reason)
        self._violation(m.tid, p, reason)
        self._send(p, w.Nack(m.seq, w.Code.REFUSED, reason))

    def _violation(self, tid: str, p: Peer, reason: str) -> None:
        try:
            self._grants.reject(tid, p.label, reason)  # records it, fails the grant if live
        except GrantRefused:
            pass

    def _on_cancel(self, p: Peer, m: w.Cancel) -> None:
        a = p.approved.pop(m.seq, None)
        if a is not None:
            self._approved_tids.discard(a.tid)
            self._forget_offer(a.tid, m.seq)
            self._grants.end_write(a.token, p, 0)
            self._grants.fail(a.tid, TransferAborted(f"sender could not write: {m.reason}", transfer_id=a.tid, peer=p.label, transport=self.name))

    def _kill_conn(self, conn: object) -> None:
        """GrantTable drain: an approved write into a revoked grant did not finish in time."""
        if isinstance(conn, Peer):
            self._io.submit(lambda: self._drop_stuck(conn))

    def _drop_stuck(self, p: Peer) -> None:
        for seq, a in list(p.approved.items()):
            if GrantTable.cancelled(a.token):
                del p.approved[seq]
                self._approved_tids.discard(a.tid)
                self._forget_offer(a.tid, seq)
                self._grants.end_write(a.token, p, 0)
                if a.writing:  # an offer not taken up was sent its Withdraw already
                    self._send(p, w.Nack(seq, w.Code.ABORTED, "grant revoked while the write was in flight"))
