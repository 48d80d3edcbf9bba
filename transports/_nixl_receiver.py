"""The receiver role of the ``nixl`` transport.

A peer writes into our memory only after we approved its Ask (see ``transports/nixl.py``):
``_on_ask`` checks the destination segments against the grant table (Rule 1, the same
``GrantTable.begin_write`` tcp and shm run per frame) and remembers the approval;
``_on_done`` matches the WRITE's notification to it - transfer id, byte count and the
digest of the segments - and completes the grant (Rule 2) or reports the violation.
Every method here runs on the transport's NIXL thread, except ``grant`` and ``_kill_conn``.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Sequence

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

    if TYPE_CHECKING:  # provided by NixlTransport

        def _send(self, p: Peer, m: Any, raw: bytes = b"") -> bool: ...

        def _watch(self, p: Peer, pid: int, host_id: str, pidns: str, start: int) -> None: ...

        def _bell_of(self, host_id: str, netns: str, bell: str) -> str: ...

    def grant(self, transfer_id: str, regions: Sequence[Region]) -> None:
        super().grant(transfer_id, regions)  # type: ignore[misc]  # GrantReceiver
        self._io.wake()  # an Ask may follow soon: poll warm

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
            p.said_hello = True
            self._send(p, w.HelloOk(self._incarnation))

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
        self._send(p, w.AskOk(m.seq, epoch, md, list(self._reg_rows) if moved else []))

    def _on_done(self, p: Peer, m: w.Done) -> None:
        """Match a WRITE's notification to its approval: complete the grant, or report."""
        a = p.approved.pop(m.seq, None)
        if a is None:
            reason = f"write {m.seq} for transfer {m.tid} landed without an approval (bytes may be outside the grant)"
        else:
            self._approved_tids.discard(a.tid)
            ok = a.tid == m.tid and m.nbytes == a.nbytes and m.digest == a.digest
            self._grants.end_write(a.token, p, a.nbytes if ok else 0)
            if ok:
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
                self._grants.end_write(a.token, p, 0)
                self._send(p, w.Nack(seq, w.Code.ABORTED, "grant revoked while the write was in flight"))
