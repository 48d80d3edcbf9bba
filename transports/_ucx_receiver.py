"""The receiver role of the ``ucx`` transport.

Nothing is ever posted into our memory ahead of time: a sender sends its Ask and, right
behind it, one tagged message per segment; UCX holds each segment as an *unexpected*
message (for a large one, only its rendezvous header) until we take it. ``_on_ask`` checks
every destination segment against the grant table (Rule 1, the check tcp and shm make per
frame) and keeps an ``Approval``; ``_probe_data`` then takes that write's messages off
UCX's queue by their tag prefix. A message (one segment, or a packed run of small ones -
``_ucx_wire.message_groups``) is received only when its index was not taken yet, its
length is exactly that of its approved segments, and the grant table accepts the write of
those segments once more (``GrantTable.begin_write``: the grant may have been revoked
since). One segment is received straight into granted memory; a packed run into a buffer
of its own, scattered into its granted segments when it landed, while the grant table
still counts the write (a revoke waits for it). Anything else - the segments of a refused Ask, of a failed or revoked grant, or
that do not fit - is received into a one-byte scratch buffer: UCX reports it truncated and
drops it, rendezvous data included, so no byte moves. A segment that does not fit a live
approval is also reported as a violation that fails the grant.
Every method here runs on the transport's UCX thread, except ``_kill_conn``.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import numpy as np

from pdfabric.errors import (
    ConnectError,
    FrameError,
    GrantRefused,
    PeerGone,
    TransferAborted,
    TransportError,
)

from . import _ucx_wire as w
from ._iov import iovecs, local_copy
from ._state import GrantTable, MemoryTable
from ._ucx_peer import Approval, Peer, split_completed
from ._ucx_worker import UCX_ERRORS, Array, api, why
from .base import Rejection, Status

if TYPE_CHECKING:
    from ._ucx_worker import WorkerLoop

__all__ = ["ReceiverRole"]


class ReceiverRole:
    """Receiver handlers; mixed into ``UcxTransport`` (which supplies these)."""

    name: str
    _io: WorkerLoop
    _worker: Any
    _mem: MemoryTable
    _grants: GrantTable
    _incarnation: str
    _peers: dict[str, Peer]
    _approved_tids: set[str]
    _recvs: list[tuple[Any, Approval, int, object]]
    _discards: list[Any]
    _scratch: np.ndarray
    _wmask: Any

    if TYPE_CHECKING:  # provided by UcxTransport

        def _send(self, p: Peer, m: Any) -> bool: ...

        def _new_peer(self, inc: str, label: str, address: bytes) -> Peer: ...

        def _watch(self, p: Peer, pid: int, host_id: str, pidns: str, start: int) -> None: ...

        def _gone(self, p: Peer, err: TransportError) -> None: ...

    # -- handshake -------------------------------------------------------------------------
    def _on_hello(self, m: w.Hello) -> None:
        p = self._peers.get(m.frm)
        if p is None or p.gone is not None:
            try:
                p = self._new_peer(m.frm, f"{m.frm[:8]}@pid{m.pid}", m.address)
            except ConnectError as e:
                self._grants.record(Rejection("", f"{m.frm[:8]}@pid{m.pid}", f"hello with an unusable address: {e.message}"))
                return
            self._watch(p, m.pid, m.host_id, m.pidns, m.start)
        p.key_out, p.last_heard = m.key, time.monotonic()
        if m.version != w.UCX_WIRE_VERSION:
            self._send(p, w.HelloNo(w.Code.VERSION, f"ucx wire version {m.version}, this side speaks {w.UCX_WIRE_VERSION}"))
        elif m.to != self._incarnation:
            self._send(p, w.HelloNo(w.Code.STALE, f"hello for incarnation {m.to[:8]}, this transport is {self._incarnation[:8]}"))
        else:
            p.said_hello = True
            self._send(p, w.HelloOk(self._incarnation, p.key_in))

    # -- approvals -------------------------------------------------------------------------
    def _on_ask(self, p: Peer, m: w.Ask) -> None:
        try:
            segs = w.unpack_segments(m.segs)
        except FrameError as e:  # its segments stay queued until the peer is gone
            self._grants.record(Rejection(m.tid, p.label, e.message))
            self._send(p, w.AskNo(m.seq, w.Code.FRAME, e.message))
            return
        lens = segs[:, 1].tolist()  # Python ints: no wrap-around
        groups = w.message_groups(lens)
        a = Approval(m.seq, m.tid, p, api.UCXXTag(w.write_tag(p.key_in, m.seq)), segs, lens, m.notify,
                     sum(lens), bytearray(len(groups)), len(groups), groups)  # fmt: skip
        p.approvals[m.seq] = a
        if not p.said_hello:
            a.dead = True
            self._grants.record(Rejection(m.tid, p.label, "Ask from a transport that never said hello"))
            self._send(p, w.AskNo(m.seq, w.Code.REFUSED, "say hello first"))
            return
        try:
            if m.tid in self._approved_tids:
                self._grants.reject(m.tid, p.label, "a write for this transfer is already in flight")
            token = self._grants.begin_write(m.tid, segs, p.label, p)  # Rule 1; GrantRefused
        except GrantRefused as e:  # GrantTable counted the refusal
            a.dead = True
            self._send(p, w.AskNo(m.seq, w.Code.REFUSED, e.message))
            return
        granted = self._grants.progress(m.tid)[1]
        self._grants.end_write(token, p, 0)  # each segment is a write of its own (_on_segment)
        if a.nbytes != granted:
            a.dead = True
            err = FrameError(f"write of {a.nbytes} bytes; {granted} were granted (a transfer fills its grant exactly)",
                             transfer_id=m.tid, peer=p.label, transport=self.name)  # fmt: skip
            self._grants.fail(m.tid, err)
            self._send(p, w.AskNo(m.seq, w.Code.FRAME, err.message))
            return
        self._approved_tids.add(m.tid)
        if a.nbytes == 0:
            self._complete(a)

    # -- data ------------------------------------------------------------------------------
    def _probe_data(self) -> bool:
        """Take the queued segments of every write that was Asked (approved or not)."""
        taken = False
        for p in list(self._peers.values()):
            for a in list(p.approvals.values()):
                while a.taken < a.expected:
                    probe = self._worker.tag_probe(a.prefix, self._wmask, True)
                    if not probe.matched:
                        break
                    a.taken += 1
                    taken = True
                    self._on_segment(a, probe)
                self._forget(a)
        return taken

    def _on_segment(self, a: Approval, probe: Any) -> None:
        """One segment of ``a``: receive it into its granted bytes, or drop it."""
        if a.dead:
            self._discard(probe)
            return
        i, n = w.split_data_tag(probe.sender_tag.value), probe.length
        start, end = a.groups[i] if i < len(a.groups) else (0, 0)
        size = sum(a.lens[start:end])
        if i >= len(a.groups) or a.got[i] or n != size:
            self._discard(probe)
            what = "came twice" if i < len(a.groups) and a.got[i] else f"of {n} bytes does not fit the Ask"
            self._violation(a, f"segment {i} of write {a.seq} {what}")
            return
        a.peer.last_heard = time.monotonic()
        try:
            token = self._grants.begin_write(a.tid, a.segs[start:end], a.peer.label, a.peer)
        except GrantRefused as e:  # revoked or failed since the Ask
            self._discard(probe)
            self._end_approval(a, w.Code.ABORTED if self._aborted(a.tid) else w.Code.REFUSED, e.message)
            return
        staged = None
        try:
            if end - start == 1:  # one segment: straight into its granted bytes
                buf: Any = self._mem.view(int(a.segs[start, 0]), n)
            else:  # packed: scattered into the granted bytes once it landed (_reap_recvs)
                buf = staged = np.empty(n, dtype=np.uint8)
            req = self._worker.tag_recv_with_handle(Array(buf), probe)
        except (*UCX_ERRORS, TransportError) as e:
            self._grants.end_write(token, a.peer, 0)
            self._fail_approval(a, f"UCX refused the receive: {why(e)}")
            return
        a.got[i] = 1
        a.outstanding += 1
        self._recvs.append((req, a, n, token, None if staged is None else (staged, start, end)))

    def _discard(self, probe: Any) -> None:
        """Take a message we refuse off UCX's queue without copying it anywhere."""
        try:
            self._discards.append(self._worker.tag_recv_with_handle(Array(self._scratch), probe))
        except UCX_ERRORS:
            pass

    def _reap_recvs(self, full: bool = False) -> bool:
        """Account for receives UCX completed (see ``split_completed``); finish approvals
        whose bytes all landed."""
        if self._discards:
            self._discards = [r for r in self._discards if not r.completed]
        if not self._recvs:
            return False
        done, self._recvs = split_completed(self._recvs, full)
        for req, a, n, token, staged in done:
            try:
                req.check_error()
                ok, reason = True, ""
            except UCX_ERRORS as e:
                ok, reason = False, why(e)
            if ok and staged is not None:  # the grant is still held by ``token``: scatter
                buf, start, end = staged
                try:
                    local_copy(iovecs(np.array([buf.ctypes.data], dtype=np.uint64), np.array([n], dtype=np.uint64)),
                               a.segs[start:end])
                except TransportError as e:
                    ok, reason = False, e.message
            self._grants.end_write(token, a.peer, n if ok else 0)
            a.outstanding -= 1
            if ok:
                a.received += n
            elif not a.dead:
                self._fail_approval(a, f"a receive failed mid-transfer: {reason}")
            if not a.dead and a.received == a.nbytes and a.outstanding == 0:
                self._complete(a)
            self._forget(a)
        return bool(done)

    def _complete(self, a: Approval) -> None:
        a.dead = True  # nothing more to take
        self._approved_tids.discard(a.tid)
        self._forget(a)
        err = self._grants.stream_end(a.tid, a.peer, a.nbytes, 1, a.nbytes, a.notify)  # Rule 2
        if err is None:
            self._send(a.peer, w.Fin(a.seq, a.nbytes))
        else:  # the grant ended meanwhile (revoked, failed)
            code = w.Code.ABORTED if isinstance(err, TransferAborted) else w.Code.FRAME
            self._send(a.peer, w.Nack(a.seq, code, err.message))

    # -- ending approvals ------------------------------------------------------------------
    def _violation(self, a: Approval, reason: str) -> None:
        try:
            self._grants.reject(a.tid, a.peer.label, reason)  # records it, fails the grant
        except GrantRefused:
            pass
        self._end_approval(a, w.Code.REFUSED, reason)

    def _fail_approval(self, a: Approval, reason: str) -> None:
        self._grants.fail(a.tid, PeerGone(reason, transfer_id=a.tid, peer=a.peer.label, transport=self.name))
        self._end_approval(a, w.Code.GONE, reason)

    def _end_approval(self, a: Approval, code: int, reason: str, tell: bool = True) -> None:
        """Stop taking segments of ``a`` into memory; the rest are dropped as they come."""
        if a.dead:
            return
        a.dead = True
        self._approved_tids.discard(a.tid)
        if tell and a.peer.gone is None:
            self._send(a.peer, w.Nack(a.seq, code, reason))
        self._forget(a)

    def _forget(self, a: Approval) -> None:
        """Drop ``a`` once it ended and every segment it expects was taken and landed."""
        if a.dead and a.taken >= a.expected and a.outstanding == 0 and a.peer.approvals.get(a.seq) is a:
            del a.peer.approvals[a.seq]

    def _aborted(self, tid: str) -> bool:
        try:
            return self._grants.poll(tid) is Status.ABORTED
        except TransportError:
            return True

    def _sweep_approvals(self) -> None:
        """Approvals whose grant ended (revoked, failed) while no segment was landing: the
        sender is told at once instead of at its next segment."""
        for p in list(self._peers.values()):
            for a in list(p.approvals.values()):
                if a.dead or a.outstanding:
                    continue
                try:
                    state = self._grants.poll(a.tid)
                except TransportError:
                    state = Status.ABORTED
                if state.finished:
                    code = w.Code.ABORTED if state is Status.ABORTED else w.Code.REFUSED
                    self._end_approval(a, code, f"the grant was {state.value} before the write finished")

    def _on_cancel(self, p: Peer, m: w.Cancel) -> None:
        a = p.approvals.get(m.seq)
        if a is None:
            return
        a.expected = min(a.expected, m.posted)
        if not a.dead:
            self._grants.fail(a.tid, TransferAborted(f"sender could not write: {m.reason}", transfer_id=a.tid, peer=p.label, transport=self.name))
            self._end_approval(a, w.Code.ABORTED, m.reason, tell=False)
        self._forget(a)

    def _kill_conn(self, conn: object) -> None:
        """GrantTable drain: a receive into a revoked grant did not finish in time. UCX
        cannot recall a receive it started; the peer is dropped, which fails it sooner."""
        if isinstance(conn, Peer):
            self._io.submit(lambda: self._gone(conn, PeerGone("a receive into a revoked grant did not finish",
                                                                peer=conn.label, transport=self.name)))  # fmt: skip
