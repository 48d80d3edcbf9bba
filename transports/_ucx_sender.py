"""The sender role of the ``ucx`` transport.

A write sends its Ask (destination segments and the notification) and, right behind it,
one tagged send per message (``_ucx_wire``: a segment, straight from the registered source
memory, or a run of small segments gathered into one buffer) - without waiting
for an answer: the receiver takes the segments off its queue only once it approved the
Ask, and drops them unread otherwise (``_ucx_receiver``). UCX picks eager or rendezvous
per size; on one host its rendezvous is a single cross-memory copy. The write is DONE when
the receiver's Fin says every byte landed; AskNo or Nack fail it with the receiver's
reason. Sends still in flight when the write ends are kept until UCX completes them.
Every method here runs on the transport's UCX thread.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any

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

import numpy as np

from . import _ucx_wire as w
from ._iov import iovecs, local_copy
from ._state import MemoryTable
from ._ucx_peer import Peer, Write, split_completed
from ._ucx_worker import UCX_ERRORS, Array, api, why
from .base import Status

if TYPE_CHECKING:
    from ._ucx_worker import WorkerLoop

__all__ = ["CODE_ERRORS", "SenderRole"]

log = logging.getLogger("pdfabric.transports")

CODE_ERRORS: dict[int, type[TransportError]] = {
    w.Code.REFUSED: GrantRefused,
    w.Code.ABORTED: TransferAborted,
    w.Code.FRAME: FrameError,
    w.Code.STALE: StalePeer,
    w.Code.VERSION: ConnectError,
    w.Code.GONE: PeerGone,
}


class SenderRole:
    """Sender handlers; mixed into ``UcxTransport`` (which supplies these)."""

    name: str
    _io: WorkerLoop
    _lock: threading.Lock
    _mem: MemoryTable
    _sends: list[tuple[Any, Write]]

    if TYPE_CHECKING:  # provided by UcxTransport

        def _send(self, p: Peer, m: Any) -> bool: ...

    def _ask(self, wr: Write) -> None:
        p = wr.peer
        if self._io.stopping or p.gone is not None:
            err = p.gone or TransportClosed("transport closed", transport=self.name)
            self._finish(wr, type(err)(err.message, transfer_id=wr.handle.transfer_id, peer=p.label, transport=self.name))
            return
        if not p.owes():
            p.last_heard = time.monotonic()  # silence counts from now
        p.writes[wr.seq] = wr
        if not self._send(p, w.Ask(wr.seq, wr.handle.transfer_id, wr.segs, wr.notify)):
            return  # the peer is gone, which failed wr
        posted = 0
        rows = wr.pieces.tolist()
        groups = w.message_groups([r[2] for r in rows])
        wr.messages = len(groups)
        try:
            for i, (a, b) in enumerate(groups):
                if b - a == 1:  # one segment: sent from the registered memory itself
                    src, _, n = rows[a]
                    buf: Any = self._mem.view(src, n)
                else:  # a run of small segments, packed
                    part = wr.pieces[a:b]
                    buf = np.empty(int(part[:, 2].sum()), dtype=np.uint8)
                    local_copy(iovecs(part[:, 0], part[:, 2]), iovecs(np.array([buf.ctypes.data], dtype=np.uint64),
                                                                      np.array([len(buf)], dtype=np.uint64)))
                    wr.staged.append(buf)
                req = p.ep.tag_send(Array(buf), api.UCXXTag(w.data_tag(p.key_out, wr.seq, i)))
                self._sends.append((req, wr))
                posted += 1
        except (*UCX_ERRORS, TransportError) as e:
            p.writes.pop(wr.seq, None)
            reason = f"UCX refused a send: {why(e)}"
            self._finish(wr, PeerGone(reason, transfer_id=wr.handle.transfer_id, peer=p.label, transport=self.name))
            self._send(p, w.Cancel(wr.seq, posted, reason))

    def _on_fin(self, p: Peer, m: w.Fin) -> None:
        wr = p.writes.pop(m.seq, None)
        if wr is None:
            log.warning("ucx: receiver %s finished write %d, which already ended here", p.label, m.seq)
            return
        err = None
        if m.nbytes != wr.handle.nbytes:
            err = FrameError(f"receiver counted {m.nbytes} of {wr.handle.nbytes} bytes",
                             transfer_id=wr.handle.transfer_id, peer=p.label, transport=self.name)  # fmt: skip
        self._finish(wr, err)

    def _on_answer(self, p: Peer, m: w.AskNo | w.Nack) -> None:
        wr = p.writes.pop(m.seq, None)
        if wr is None:
            log.warning("ucx: receiver %s refused write %d after it ended: %s", p.label, m.seq, m.reason)
            return
        cls = CODE_ERRORS.get(m.code, TransportError)
        self._finish(wr, cls(f"receiver refused: {m.reason}", transfer_id=wr.handle.transfer_id, peer=p.label, transport=self.name))

    def _reap_sends(self, full: bool = False) -> bool:
        """Account for sends UCX completed (see ``split_completed``); a failed one fails its write."""
        if not self._sends:
            return False
        done, self._sends = split_completed(self._sends, full)
        for req, wr in done:
            try:
                req.check_error()
            except UCX_ERRORS as e:
                self._send_failed(wr, e)
        return bool(done)

    def _send_failed(self, wr: Write, e: BaseException) -> None:
        p = wr.peer
        if p.writes.pop(wr.seq, None) is None:
            return
        reason = f"a send to the peer failed: {why(e)}"
        self._finish(wr, PeerGone(reason, transfer_id=wr.handle.transfer_id, peer=p.label, transport=self.name))
        self._send(p, w.Cancel(wr.seq, wr.messages, reason))

    def _finish(self, wr: Write, err: TransportError | None) -> None:
        with self._lock:
            wr.peer.tids.discard(wr.handle.transfer_id)
        wr.handle.resolve(Status.DONE if err is None else Status.FAILED, err)
