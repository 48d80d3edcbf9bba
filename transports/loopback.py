"""``loopback``: in-process reference transport for tests.

Peers find each other through a ``LoopbackHub`` (one per test, or the module default).
A write runs on the sender's worker thread: for every piece it asks the receiver's grant
table (the same one the socket transports use), then ``memmove``s. Closing either side
mid-transfer fails the other side's transfer with ``PeerGone``, as a dead process would.
"""

from __future__ import annotations

import ctypes
import os
import queue
import threading
import uuid
import weakref

import numpy as np

from pdfabric.errors import ConnectError, PeerGone, StalePeer, TransportError

from ._state import GrantReceiver, GrantTable, MemoryTable
from ._plan import check_no_overlap, coalesce_plan
from .base import (
    MAX_NOTIFY_BYTES,
    Capabilities,
    PeerDescriptor,
    PeerId,
    Status,
    TransferHandle,
    TransferPlan,
    Transport,
)

__all__ = ["LoopbackTransport", "LoopbackHub"]

_PIECE_CHUNK = 1 << 20  # memmove in 1 MiB steps so a close mid-transfer is noticed


class LoopbackHub:
    """Rendezvous of in-process transports, by incarnation."""

    def __init__(self) -> None:
        self._peers: "weakref.WeakValueDictionary[str, LoopbackTransport]" = weakref.WeakValueDictionary()
        self._lock = threading.Lock()

    def add(self, t: "LoopbackTransport") -> None:
        with self._lock:
            self._peers[t.incarnation] = t

    def remove(self, t: "LoopbackTransport") -> None:
        with self._lock:
            self._peers.pop(t.incarnation, None)

    def get(self, incarnation: str) -> "LoopbackTransport | None":
        with self._lock:
            return self._peers.get(incarnation)


DEFAULT_HUB = LoopbackHub()


class LoopbackTransport(GrantReceiver, Transport):
    """In-process transport; the reference behaviour for the conformance suite."""

    name = "loopback"
    capabilities = Capabilities(push=True, same_host_only=True, same_process_only=True)

    def __init__(self, *, hub: LoopbackHub | None = None, transfer_timeout_s: float = 30.0) -> None:
        self.transfer_timeout_s = transfer_timeout_s
        self.incarnation = uuid.uuid4().hex
        self._hub = hub or DEFAULT_HUB
        self._mem = MemoryTable(self.name)
        self._grants = GrantTable(self.name, self._mem)
        self._peers: dict[PeerId, str] = {}
        self._jobs: "queue.SimpleQueue[tuple | None]" = queue.SimpleQueue()
        self._written_to: "weakref.WeakSet[LoopbackTransport]" = weakref.WeakSet()
        self._closed = False
        self._hub.add(self)
        self._worker = threading.Thread(target=self._run, name="pdfabric-loopback", daemon=True)
        self._worker.start()

    def descriptor(self) -> PeerDescriptor:
        return PeerDescriptor("loopback", self.incarnation, "localhost", os.getpid(), f"loopback:{self.incarnation}")

    def connect(self, peer: PeerDescriptor, timeout: float | None = None) -> PeerId:
        self._check_open()
        if peer.transport != self.name:
            raise ConnectError(f"descriptor is for transport {peer.transport!r}", transport=self.name)
        if peer.pid != os.getpid():
            raise ConnectError("loopback peers must live in one process", transport=self.name)
        if self._hub.get(peer.incarnation) is None:
            raise StalePeer(f"no live loopback transport with incarnation {peer.incarnation[:8]}", transport=self.name)
        pid = PeerId(peer.incarnation)
        self._peers[pid] = peer.incarnation
        return pid

    def write(self, peer: PeerId, plan: TransferPlan, notify: bytes = b"") -> TransferHandle:
        self._check_open()
        if peer not in self._peers:
            raise ConnectError(f"not connected to peer {peer}; call connect() first", transport=self.name)
        if len(notify) > MAX_NOTIFY_BYTES:
            raise ValueError(f"notify payload of {len(notify)} bytes is over {MAX_NOTIFY_BYTES}")
        pieces = coalesce_plan(plan)
        self._mem.check(pieces[:, 0], pieces[:, 2])
        check_no_overlap(pieces, plan.transfer_id)
        handle = TransferHandle(plan.transfer_id, peer, plan.nbytes, self.name)
        self._jobs.put((handle, pieces, notify))
        return handle

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            handle, pieces, notify = job
            try:
                self._push(handle, pieces, notify)
            except TransportError as e:
                handle.resolve(Status.FAILED, e)

    def _push(self, handle: TransferHandle, pieces: np.ndarray, notify: bytes) -> None:
        tid = handle.transfer_id
        peer = self._hub.get(self._peers[handle.peer])
        for s, d, n in pieces.tolist():
            for off in range(0, n, _PIECE_CHUNK):
                k = min(_PIECE_CHUNK, n - off)
                if peer is None or peer.closed or self._closed:
                    raise PeerGone("peer closed mid-transfer", transfer_id=tid, transport=self.name)
                self._written_to.add(peer)
                seg = np.array([[d + off, k]], dtype=np.uint64)
                token = peer._grants.begin_write(tid, seg, self.incarnation[:8], self)
                try:
                    ctypes.memmove(d + off, s + off, k)
                finally:
                    peer._grants.end_write(token, self, k)
        if peer is None or peer.closed:
            raise PeerGone("peer closed before the transfer ended", transfer_id=tid, transport=self.name)
        err = peer._grants.stream_end(tid, self, handle.nbytes, 1, handle.nbytes, notify)
        if err is not None:
            raise err
        handle.resolve(Status.DONE)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._hub.remove(self)
        self._grants.close()
        for peer in list(self._written_to):
            peer._grants.conn_lost(self, self.incarnation[:8], "sender closed")
        self._jobs.put(None)
        self._worker.join(5.0)
        self._mem.clear()
