"""``ucx``: KV blocks as UCX tagged messages between worker-address endpoints (ucxx).

Theory of operation
-------------------
*One UCX worker per transport object* (and one context, with this transport's UCX
options: ``tls``, ``net_devices``). Endpoints are made from the peer's *worker address*,
never through a UCX listener: a listener endpoint is wired up over sockets and, on one
host, ends up on TCP-speed paths, while a worker-address endpoint gets every transport
UCX has - shared memory and a single cross-memory copy (``cma``) on one host, RDMA where
present. The worker address travels in the descriptor's ``extra`` (``_ucx_wire.PeerInfo``;
msgpack, never pickle); ``connect`` makes the endpoint and says Hello with its own worker
address, so the receiver can make one back, and waits for HelloOk.

*One thread owns the worker* (``_ucx_worker.WorkerLoop``), which sleeps on the worker's
wakeup descriptor when there is nothing to do: an idle transport costs no CPU, unlike a
polling progress thread. ``register``/``grant`` need no UCX call (tag messages need no
registration); ``connect`` waits for the thread, ``write`` hands it the write and returns.

*Grants* (``_ucx_receiver``). Tag matching is per worker, so each message names its
sender and purpose in its tag (``_ucx_wire``). The sender sends an Ask with the
destination segments and, right behind it, one tagged message per segment - or per run of
small segments, packed into one buffer and scattered by the receiver (up to 1 MiB a
message and 64 MiB a write, ``_ucx_wire.message_groups``). The receiver
never pre-posts a receive: segments wait in UCX's unexpected queue (a large one as its
rendezvous header only) until the receiver checked the Ask against its grant (Rule 1);
then each is received into granted memory after its index and length are checked and the
grant table takes the write again - so a refused Ask, a revoked grant or a segment that
does not fit never gets a byte (such segments are dropped unread). When every byte
landed, the grant completes (Rule 2) and the sender gets Fin; its handle is DONE then.
One round trip per write.

*Who copies.* On one host UCX moves a large segment with one cross-memory copy; with
``rndv_scheme="put_zcopy"`` (the default) the *sender* makes it, into the receive buffer
the receiver named. UCX treats a failed cross-memory copy on an endpoint without UCX error
handling as fatal to the process making it, so the copy is made by the side that does not
survive the other's death anyway: a sender that dies mid-transfer never takes the
receiver down. The mirror case stands: a receiver that dies while a sender's copy into it
is under way aborts that sender (as it would with NIXL's WRITE).

*Peer death.* Same-host peers are watched with a pidfd (one pid namespace); a peer that
owes an answer is pinged every ``HEARTBEAT_S`` and declared gone after ``peer_timeout_s``
of silence; a UCX error on a send or receive means gone too. A gone peer fails its pending
writes, and the grants it was approved to write, with ``PeerGone``. Receives it had under
way hold their grant (nothing else may reuse that memory) until they complete, its
process is seen to exit, or - after its Bye - ``_BYE_GRACE_S``. With
``ucx_error_handling="peer"`` (the default) UCX fails and purges a send to a process that
died, and a dying receiver never takes its sender down. On one host large segments still
take one cross-memory copy (``peer_options``: UCX needs ``CMA_MEMORY_INVALIDATE`` for
that lane with peer error handling, safe only where the process's UCX has a registration
cache); where it has none - NIXL's bundled UCX hooked memory events after ucxx's, or
``UCX_RCACHE_ENABLE=n`` - peer mode keeps to TCP without zero-copy sends, which UCX 1.21
would crash on when a peer dies (``cross_memory_copy`` says which).
``"none"`` also uses shared memory for small messages, at two costs: UCX cannot cancel a
send to a process that died, so such a send - and the worker it holds - stays until the
process exits, and a receiver that dies while a sender's copy into it is under way aborts the
sender's process (see *Who copies*). Choose it only where that is acceptable.

*Close* says Bye to every peer, fails pending transfers, closes the endpoints, then drops
the worker and the context. A transport left open is closed at interpreter exit.
"""

from __future__ import annotations

import atexit
import collections
import concurrent.futures as cf
import functools
import itertools
import logging
import os
import random
import socket
import threading
import time
import uuid
import weakref
from typing import Any, Literal

import numpy as np

from pdfabric.errors import (
    ConnectError,
    FrameError,
    PeerGone,
    StalePeer,
    TransportClosed,
    TransportError,
)

from . import _ucx_wire as w
from ._plan import check_no_overlap, coalesce_plan
from ._state import GrantReceiver, GrantTable, MemoryTable
from ._ucx_peer import FULL_SCAN_S, Approval, Peer, Write
from ._ucx_receiver import ReceiverRole
from ._ucx_sender import CODE_ERRORS, SenderRole
from ._ucx_worker import (
    UCX_ERRORS,
    Array,
    PidWatch,
    WorkerLoop,
    api,
    make_worker,
    peer_options,
    proc_start,
    why,
)
from .base import (
    MAX_NOTIFY_BYTES,
    Capabilities,
    PeerDescriptor,
    PeerId,
    Rejection,
    TransferHandle,
    TransferPlan,
    Transport,
)

__all__ = ["UcxTransport"]

log = logging.getLogger("pdfabric.transports")

HOT_S = 1e-3  # sleep cap while receives or sends are in flight (UCX's wakeup is the fast path)
IDLE_S = 1.0  # ... when nothing is owed
HEARTBEAT_S = 1.0
_LIVENESS_S = 0.1
_BURST = 256  # progress calls / probes per round, so commands are not starved
_JOIN_S = 5.0
_FLUSH_S = 0.2  # close: time for Bye and endpoint closes to leave
_BYE_GRACE_S = 1.0  # after a peer's Bye, its unfinished writes into us can no longer come
_OPEN: weakref.WeakSet[UcxTransport] = weakref.WeakSet()


@functools.cache
def _close_at_exit() -> None:
    """A transport its owner did not close is closed before the interpreter stops."""
    atexit.register(lambda: [t.close() for t in list(_OPEN)])


@functools.cache
def _warn_tcp_only() -> None:
    log.warning(
        "ucx: this process's UCX has no registration cache (another UCX in the process, e.g. "
        "NIXL's, took over the memory hooks, or UCX_RCACHE_ENABLE=n): with peer error handling "
        "same-host peers use TCP, and sends copy rather than register memory"
    )


class UcxTransport(SenderRole, ReceiverRole, GrantReceiver, Transport):
    """Push transport of UCX tagged messages over worker-address endpoints; any hosts."""

    name = "ucx"
    capabilities = Capabilities(push=True)

    def __init__(
        self,
        *,
        tls: str | None = None,
        net_devices: str | None = None,
        ucx_error_handling: Literal["none", "peer"] = "peer",
        rndv_scheme: Literal["put_zcopy", "get_zcopy", "auto"] = "put_zcopy",
        connect_timeout_s: float = 5.0,
        transfer_timeout_s: float = 30.0,
        peer_timeout_s: float = 10.0,
    ) -> None:
        if ucx_error_handling not in ("none", "peer"):
            raise ValueError(f"ucx_error_handling must be 'none' or 'peer', got {ucx_error_handling!r}")
        if rndv_scheme not in ("put_zcopy", "get_zcopy", "auto"):
            raise ValueError(f"rndv_scheme must be 'put_zcopy', 'get_zcopy' or 'auto', got {rndv_scheme!r}")
        self.connect_timeout_s = connect_timeout_s
        self.transfer_timeout_s = transfer_timeout_s
        self.peer_timeout_s = peer_timeout_s
        self._error_handling = ucx_error_handling == "peer"
        extra, cache = peer_options() if self._error_handling else ({}, True)
        self._ctx, self._worker, applied = make_worker(tls, net_devices, rndv_scheme, extra)
        #: whether a peer on this host gets one cross-memory copy (``none`` mode always;
        #: peer mode where ``peer_options`` allows it) rather than UCX's TCP path
        self.cross_memory_copy = not self._error_handling or (cache and applied)
        if not cache:
            _warn_tcp_only()
        self._incarnation = uuid.uuid4().hex
        self._mem = MemoryTable(self.name)
        self._grants = GrantTable(self.name, self._mem, kill_conn=self._kill_conn)
        self._closed = False
        self._lock = threading.Lock()
        self._by_id: dict[PeerId, Peer] = {}
        self._peers: dict[str, Peer] = {}  # by incarnation; the UCX thread's
        self._by_key: dict[int, Peer] = {}
        self._zombies: dict[Peer, float] = {}  # gone peers with receives under way -> release time
        self._pids = PidWatch()
        self._seq = itertools.count(1)
        self._rng = random.Random()
        self._approved_tids: set[str] = set()
        self._ctrl_in: collections.deque[tuple[Any, np.ndarray, int]] = collections.deque()
        self._ctrl_out: list[tuple[Any, np.ndarray, Peer]] = []
        self._recvs: list[tuple[Any, Approval, int, object, Any]] = []  # (request, approval, bytes, grant token, staged)
        self._sends: list[tuple[Any, Write]] = []
        self._discards: list[Any] = []
        self._orphans: list[Any] = []  # requests to peers that are gone: kept until close
        self._closing: list[Any] = []  # endpoint close requests under way
        self._scratch = np.empty(1, np.uint8)
        self._ctrl_tag, self._mask = api.UCXXTag(w.CTRL), api.UCXXTagMask(w.KIND_MASK)
        self._wmask, self._kmask = api.UCXXTagMask(w.WRITE_MASK), api.UCXXTagMask(w.KIND_MASK | w.KEY_MASK)
        self._info = w.encode_info(w.PeerInfo(w.UCX_WIRE_VERSION, self._worker.address.tobytes(),
                                              self._pids.namespace, proc_start(os.getpid()) or 0))  # fmt: skip
        self._next_check = self._next_scan = 0.0
        self._io = WorkerLoop("pdfabric-ucx", self._worker, self._step, self._poll_cap)
        self._io.start()
        _OPEN.add(self)
        _close_at_exit()

    # -- peers ----------------------------------------------------------------------------
    def descriptor(self) -> PeerDescriptor:
        from .registry import local_host_id

        return PeerDescriptor(self.name, self._incarnation, socket.gethostname(), os.getpid(),
                              f"ucx:worker-{self._incarnation[:8]}", local_host_id(), self._info)  # fmt: skip

    def connect(self, peer: PeerDescriptor, timeout: float | None = None) -> PeerId:
        self._check_open()
        info = self._check_descriptor(peer)
        pid = PeerId(peer.incarnation)
        with self._lock:
            known = self._by_id.get(pid)
        if known is not None and known.gone is None and known.hello is not None and known.hello.done() \
                and known.hello.exception() is None:  # fmt: skip
            return pid
        limit = self.connect_timeout_s if timeout is None else timeout
        p: Peer = self._io.call(lambda: self._open(peer, info))
        assert p.hello is not None
        try:
            p.hello.result(limit)
        except cf.TimeoutError:
            err = ConnectError(f"no answer to hello within {limit:.3g}s", peer=p.label, transport=self.name)
            self._io.submit(lambda: self._gone(p, err))
            raise ConnectError(
                f"worker {peer.incarnation[:8]} did not answer the handshake within {limit:.3g}s "
                "(not a pdfabric ucx transport, or unreachable)", peer=p.label, transport=self.name,
            ) from None  # fmt: skip
        return pid

    def _check_descriptor(self, peer: PeerDescriptor) -> w.PeerInfo:
        from .registry import local_host_id

        if peer.transport != self.name:
            raise ConnectError(f"descriptor is for transport {peer.transport!r}, not {self.name!r}", transport=self.name)
        try:
            info = w.decode_info(peer.extra)
        except FrameError as e:
            raise ConnectError(f"not a ucx descriptor: {e.message}", transport=self.name) from None
        if info.version != w.UCX_WIRE_VERSION:
            raise ConnectError(f"peer speaks ucx wire version {info.version}, this side {w.UCX_WIRE_VERSION}", transport=self.name)
        if peer.incarnation == self._incarnation:
            raise ConnectError("a ucx transport cannot connect to itself", transport=self.name)
        label = f"{peer.incarnation[:8]}@pid{peer.pid}"
        if peer.host_id == local_host_id() and info.pidns == self._pids.namespace:
            if peer.pid == os.getpid() and not any(t._incarnation == peer.incarnation for t in list(_OPEN)):
                raise StalePeer("the transport this descriptor names was closed; fetch its descriptor again",
                                peer=label, transport=self.name)  # fmt: skip
            if proc_start(peer.pid) != info.start:
                raise StalePeer(f"peer process {peer.pid} has exited since this descriptor was made; fetch its "
                                "descriptor again", peer=label, transport=self.name)  # fmt: skip
        return info

    def _open(self, desc: PeerDescriptor, info: w.PeerInfo) -> Peer:
        """Make (or reuse) the endpoint to a peer and say Hello; on the UCX thread."""
        from .registry import local_host_id

        p = self._peers.get(desc.incarnation)
        if p is not None and p.gone is None and p.hello is not None and (not p.hello.done() or p.hello.exception() is None):
            return p  # connected, or a handshake under way
        if p is None or p.gone is not None:
            p = self._new_peer(desc.incarnation, f"{desc.incarnation[:8]}@pid{desc.pid}", info.address)
            self._watch(p, desc.pid, desc.host_id, info.pidns, info.start)
        p.hello, p.last_heard = cf.Future(), time.monotonic()
        with self._lock:
            self._by_id[PeerId(desc.incarnation)] = p
        self._send(p, w.Hello(w.UCX_WIRE_VERSION, desc.incarnation, self._incarnation, self._worker.address.tobytes(),
                              p.key_in, os.getpid(), local_host_id(), self._pids.namespace,
                              proc_start(os.getpid()) or 0))  # fmt: skip
        return p

    def _new_peer(self, inc: str, label: str, address: bytes) -> Peer:
        try:
            ep = self._worker.create_endpoint_from_worker_address(api.UCXAddress.create_from_buffer(address),
                                                                  self._error_handling)  # fmt: skip
        except UCX_ERRORS as e:
            raise ConnectError(f"UCX cannot make an endpoint to the peer's worker address: {why(e)}",
                               peer=label, transport=self.name) from e  # fmt: skip
        key = 0
        while not key or key in self._by_key:
            key = self._rng.getrandbits(w.KEY_BITS)
        p = Peer(inc, label, ep, key, time.monotonic())
        self._peers[inc] = p
        self._by_key[key] = p
        return p

    def _watch(self, p: Peer, pid: int, host_id: str, pidns: str, start: int) -> None:
        """Watch a same-host peer's process (its exit shows up in ``_liveness``)."""
        from .registry import local_host_id

        if host_id != local_host_id() or pidns != self._pids.namespace or pid == os.getpid():
            return
        p.pidfd = self._pids.add(p, pid, start)
        if p.pidfd is None:
            self._gone(p, PeerGone(f"peer process {pid} has exited", peer=p.label, transport=self.name))

    # -- sender ---------------------------------------------------------------------------
    def write(self, peer: PeerId, plan: TransferPlan, notify: bytes = b"") -> TransferHandle:
        self._check_open()
        with self._lock:
            p = self._by_id.get(peer)
        if p is None or p.hello is None or not p.hello.done() or p.hello.exception() is not None:
            raise ConnectError(f"not connected to peer {peer}; call connect() first", transport=self.name)
        if p.gone is not None:
            raise PeerGone(f"peer is gone: {p.gone.message}", transfer_id=plan.transfer_id, peer=p.label, transport=self.name)
        if len(notify) > MAX_NOTIFY_BYTES:
            raise ValueError(f"notify payload of {len(notify)} bytes is over {MAX_NOTIFY_BYTES}")
        pieces = coalesce_plan(plan)
        if len(pieces) > w.MAX_SEGMENTS:
            raise ValueError(f"plan {plan.transfer_id}: {len(pieces)} segments after merging; at most {w.MAX_SEGMENTS}")
        self._mem.check(pieces[:, 0], pieces[:, 2])  # RegistrationError for unregistered sources
        check_no_overlap(pieces, plan.transfer_id)
        tid = plan.transfer_id
        handle = TransferHandle(tid, peer, plan.nbytes, self.name)
        with self._lock:
            if tid in p.tids:
                raise ValueError(f"transfer {tid} to this peer is already in flight")
            p.tids.add(tid)
        wr = Write(next(self._seq), handle, p, pieces, w.pack_segments(pieces[:, 1:3]), notify)
        self._io.submit(lambda: self._ask(wr))
        if self._closed and not self._io.thread.is_alive():  # close() finished before it saw this write
            self._finish(wr, TransportClosed("transport closed", transfer_id=tid, transport=self.name))
        return handle

    # -- the UCX thread -------------------------------------------------------------------
    def _step(self) -> bool:
        busy = self._progress()
        busy |= self._probe_ctrl()
        busy |= self._reap_ctrl()  # an Ask first, then the segments queued behind it
        busy |= self._probe_data()
        now = time.monotonic()
        full = now >= self._next_scan
        if full:
            self._next_scan = now + FULL_SCAN_S
        busy |= self._reap_recvs(full)
        busy |= self._reap_sends(full)
        if now >= self._next_check:
            self._liveness(now)
            self._next_check = now + _LIVENESS_S
        return busy

    def _poll_cap(self) -> float:
        if self._sends or self._ctrl_in or any(a.peer.gone is None for _, a, _, _, _ in self._recvs):
            return HOT_S
        if self._zombies or any(p.owes() for p in self._peers.values()):
            return _LIVENESS_S
        return IDLE_S

    def _progress(self) -> bool:
        n = 0
        while n < _BURST and self._worker.progress_once():
            n += 1
        return n > 0

    def _probe_ctrl(self) -> bool:
        got = 0
        while got < _BURST:
            probe = self._worker.tag_probe(self._ctrl_tag, self._mask, True)
            if not probe.matched:
                break
            got += 1
            key, n = w.key_of(probe.sender_tag.value), probe.length
            if not 0 < n <= w.MAX_CTRL_BYTES:
                self._discard(probe)
                self._grants.record(Rejection("", f"key {key:#x}", f"control message of {n} bytes refused"))
                continue
            buf = np.empty(n, np.uint8)
            self._ctrl_in.append((self._worker.tag_recv_with_handle(Array(buf), probe), buf, key))
        return got > 0

    def _reap_ctrl(self) -> bool:
        """Handle control messages in arrival order, once each has fully arrived."""
        changed = False
        if self._ctrl_out:
            self._ctrl_out = [c for c in self._ctrl_out if not c[0].completed]
        if self._closing:
            self._closing = [r for r in self._closing if not r.completed]
        while self._ctrl_in and self._ctrl_in[0][0].completed:
            req, buf, key = self._ctrl_in.popleft()
            changed = True
            try:
                req.check_error()
            except UCX_ERRORS as e:
                self._grants.record(Rejection("", f"key {key:#x}", f"control message lost: {why(e)}"))
                continue
            self._on_ctrl(key, buf)
        return changed

    def _on_ctrl(self, key: int, buf: np.ndarray) -> None:
        try:
            m = w.decode(memoryview(buf))
        except FrameError as e:
            self._grants.record(Rejection("", f"key {key:#x}", e.message))
            return
        if isinstance(m, w.Hello):
            self._on_hello(m)
            return
        p = self._by_key.get(key) if key else None
        if p is None or p.gone is not None:
            if not isinstance(m, (w.Bye, w.Pong)):
                self._grants.record(Rejection(getattr(m, "tid", ""), f"key {key:#x}", f"{type(m).__name__} from a transport that is not a peer"))
            return
        p.last_heard = time.monotonic()
        self._dispatch(p, m)

    def _dispatch(self, p: Peer, m: w.Message) -> None:
        if isinstance(m, w.Ask):
            self._on_ask(p, m)
        elif isinstance(m, w.Fin):
            self._on_fin(p, m)
        elif isinstance(m, (w.AskNo, w.Nack)):
            self._on_answer(p, m)
        elif isinstance(m, w.Cancel):
            self._on_cancel(p, m)
        elif isinstance(m, w.HelloOk):
            if m.frm == p.inc and p.hello is not None and not p.hello.done():
                p.key_out = m.key
                p.hello.set_result(None)
        elif isinstance(m, w.HelloNo):
            if p.hello is not None and not p.hello.done():
                cls = CODE_ERRORS.get(m.code, ConnectError)
                p.hello.set_exception(cls(f"peer refused the handshake: {m.reason}", peer=p.label, transport=self.name))
        elif isinstance(m, w.Ping):
            self._send(p, w.Pong())
        elif isinstance(m, w.Bye):
            self._gone(p, PeerGone(f"peer closed: {m.reason}", peer=p.label, transport=self.name), grace=_BYE_GRACE_S)

    def _send(self, p: Peer, m: Any) -> bool:
        """Send a control message to ``p``; a failure means the peer is gone."""
        data = np.frombuffer(w.encode(m), np.uint8)
        try:
            req = p.ep.tag_send(Array(data), api.UCXXTag(w.ctrl_tag(p.key_out)))
        except UCX_ERRORS as e:
            self._gone(p, PeerGone(f"cannot reach the peer: {why(e)}", peer=p.label, transport=self.name))
            return False
        if not req.completed:
            self._ctrl_out.append((req, data, p))
        return True

    def _liveness(self, now: float) -> None:
        for p in self._pids.exited():
            assert isinstance(p, Peer)
            if p.gone is None:
                self._gone(p, PeerGone("peer process exited", peer=p.label, transport=self.name), dead=True)
            else:
                self._release_recvs(p)
        for p, at in list(self._zombies.items()):
            if now >= at:
                self._release_recvs(p)
        for p in list(self._peers.values()):
            if p.gone is not None or not p.owes():
                continue
            quiet = now - p.last_heard
            if quiet > self.peer_timeout_s:
                self._gone(p, PeerGone(f"no word from peer for {quiet:.1f}s", peer=p.label, transport=self.name))
            elif quiet > HEARTBEAT_S and now - p.last_ping > HEARTBEAT_S and p.key_out:
                p.last_ping = now
                self._send(p, w.Ping())
        self._sweep_approvals()

    def _gone(self, p: Peer, err: TransportError, *, dead: bool = False, grace: float | None = None) -> None:
        """Fail everything that waits on ``p``, close its endpoint, forget it. ``dead``: its
        process exited; ``grace``: it said Bye, and stops writing within that time."""
        if p.gone is not None:
            return
        p.gone = err
        if p.hello is not None and not p.hello.done():
            p.hello.set_exception(err)
        for wr in list(p.writes.values()):
            self._finish(wr, type(err)(f"{err.message} (mid-transfer)", transfer_id=wr.handle.transfer_id, peer=p.label, transport=self.name))
        p.writes.clear()
        for a in list(p.approvals.values()):
            if not a.dead:
                self._grants.fail(a.tid, PeerGone(f"{err.message} (mid-transfer)", transfer_id=a.tid, peer=p.label, transport=self.name))
                self._end_approval(a, w.Code.GONE, err.message, tell=False)
        p.approvals.clear()
        self._drop_queued(p)
        self._orphans.extend((r, wr.staged) for r, wr in self._sends if wr.peer is p)
        self._sends = [s for s in self._sends if s[1].peer is not p]
        self._orphans.extend(c[0] for c in self._ctrl_out if c[2] is p)
        self._ctrl_out = [c for c in self._ctrl_out if c[2] is not p]
        if dead or not any(a.peer is p for _, a, _, _, _ in self._recvs):
            self._release_recvs(p)
        else:  # its receives hold their grants until it can no longer write (see the docstring)
            self._zombies[p] = time.monotonic() + grace if grace is not None else float("inf")
        if self._peers.get(p.inc) is p:
            del self._peers[p.inc]
        self._by_key.pop(p.key_in, None)
        try:  # never left to the destructor: that one blocks until the peer answers
            if p.ep.alive:  # else UCX failed it (error handling "peer") and closes it itself
                self._closing.append(p.ep.close())
        except UCX_ERRORS as e:
            log.debug("ucx: closing the endpoint to %s: %s", p.label, why(e))

    def _drop_queued(self, p: Peer) -> None:
        """Drop, unread, every segment ``p`` left in UCX's queue (its sends can complete)."""
        prefix = api.UCXXTag(w.key_tag(p.key_in))
        while True:
            probe = self._worker.tag_probe(prefix, self._kmask, True)
            if not probe.matched:
                return
            self._discard(probe)

    def _release_recvs(self, p: Peer) -> None:
        """``p`` can no longer write into us: whatever it queued is taken in first, then its
        unfinished receives give their grants back (UCX keeps the requests; nothing fills them)."""
        self._zombies.pop(p, None)
        if p.pidfd is not None:
            self._pids.remove(p.pidfd)
            p.pidfd = None
        if not any(a.peer is p for _, a, _, _, _ in self._recvs):
            return
        deadline = time.monotonic() + _FLUSH_S
        while self._progress() and time.monotonic() < deadline:
            pass
        self._reap_recvs(full=True)
        still: list[tuple[Any, Approval, int, object, Any]] = []
        for item in self._recvs:
            req, a, _, token, staged = item
            if a.peer is not p:
                still.append(item)
                continue
            self._grants.end_write(token, p, 0)
            a.outstanding -= 1
            self._orphans.append((req, staged))  # a packed message's buffer lives as long as its request
        self._recvs = still

    # -- lifecycle ------------------------------------------------------------------------
    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        _OPEN.discard(self)
        self._grants.close()
        if not self._io.stop(self._shutdown, _JOIN_S):
            log.error("ucx: the UCX thread did not stop within %ss; the worker is left alive", _JOIN_S)
            return
        self._pids.close()
        with self._lock:
            self._by_id.clear()
        self._peers.clear()
        self._by_key.clear()
        self._zombies.clear()
        for _, a, _, token, _ in self._recvs:  # the worker is gone: nothing lands any more
            self._grants.end_write(token, a.peer, 0)
        self._recvs, self._sends, self._ctrl_out, self._discards, self._orphans, self._closing = [], [], [], [], [], []
        self._ctrl_in.clear()
        self._worker = None  # endpoints went first; then the worker, then its context
        self._ctx = None
        self._mem.clear()

    def _shutdown(self) -> None:
        """Bye to every peer, fail what is pending, close the endpoints and flush."""
        closed = TransportClosed("transport closed", transport=self.name)
        for p in list(self._peers.values()):
            if p.gone is None and p.key_out:
                self._send(p, w.Bye("transport closed"))
        deadline = time.monotonic() + _FLUSH_S
        while self._ctrl_out and time.monotonic() < deadline:
            self._progress()
            self._ctrl_out = [c for c in self._ctrl_out if not c[0].completed]
        for p in list(self._peers.values()):
            self._gone(p, closed)
        try:
            self._worker.cancel_inflight_requests(0, 1)
        except UCX_ERRORS as e:
            log.debug("ucx: cancelling requests at close: %s", why(e))
        deadline = time.monotonic() + _FLUSH_S
        while time.monotonic() < deadline:
            busy = self._progress()
            self._closing = [r for r in self._closing if not r.completed]
            if not self._closing and not busy:
                break
            if not busy:
                time.sleep(1e-4)
        if self._closing:
            log.debug("ucx: %d endpoint closes unfinished at close (peers gone)", len(self._closing))

    def alive_threads(self) -> list[str]:
        """Names of this transport's threads still running (leak checks)."""
        return [self._io.thread.name] if self._io.thread.is_alive() else []
