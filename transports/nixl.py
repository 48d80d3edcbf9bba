"""``nixl``: KV blocks through a NIXL agent (UCX backend): one-sided WRITE plus notifications.

Theory of operation
-------------------
*One agent per transport object.* The interface ties an incarnation, registrations,
grants and ``close()`` to the transport object, and the connector makes one transport per
worker process - so a deployment has one NIXL agent per process. The agent is named
``pdfabric-<incarnation>``: a restarted peer is another agent, a stale descriptor cannot
reach its successor. (The tests' in-process pairs are two agents talking over UCX.)

*One thread owns the agent* (``_nixl_agent.AgentThread``): NIXL agents made without a
listener thread have no locking, so every NIXL call runs on ``pdfabric-nixl``;
``register``/``connect`` wait for it, ``write`` hands it the write and returns. NIXL has no
descriptor to sleep on, so the thread sleeps in ``select()`` on an eventfd (local calls)
and a same-host *doorbell* (an abstract Unix datagram socket peers ring after each
notification), and otherwise polls: ``HOT_S`` while a transfer, or an answer from a peer
that cannot ring, is outstanding; ``APPROVED_S`` while a peer writes into us; ``WARM_S``
while grants are open to a peer that cannot ring; ``IDLE_S`` otherwise. Idle, a
registered transport costs ~0.4% of a core. NIXL's progress thread (``progress_thread=
True``) spins a whole core and is off by default.

*Handshake.* The descriptor's ``extra`` carries the agent name and full NIXL metadata
(``_nixl_wire.PeerInfo``; msgpack, never pickle). ``connect`` loads it and says Hello with
its own connection info, so the receiver can answer; the receiver answers HelloOk.

*Grants, with one-sided writes* (``_nixl_sender``, ``_nixl_receiver``). A receiver cannot
stop bytes a peer RDMA-writes, so Rule 1 is kept before any byte moves: the sender Asks
with the destination segments; the receiver checks them against its grant table
(``GrantTable.begin_write``, the check tcp/shm make per frame; a refusal fails the grant
and is counted in ``rejections``) and answers AskOk or AskNo; the sender posts a WRITE of
exactly the approved segments, and only after AskOk (or an offer, below). Its handle is DONE when NIXL reports
the WRITE complete. The WRITE's notification (Done: sequence, transfer id, bytes, digest
of the segments) is checked against the approval: a Done without one, or for other
segments or byte counts, is a violation - recorded, the grant failed with
``GrantRefused``, the sender Nacked. The bytes have landed by then; what the receiver
guarantees is that no such transfer completes silently.

*Peer death.* Same-host peers are watched with a pidfd (one pid namespace); a peer that
owes an answer is pinged every ``HEARTBEAT_S`` and declared gone after ``peer_timeout_s``
of silence; NIXL errors on send or transfer mean gone too. A gone peer fails its pending
writes, and the grants it was approved to write, with ``PeerGone``.

*Offers: the approval before the Ask.* An Ask costs a round trip through both NIXL threads
(~0.5-1 ms on a small machine) before any byte moves. So when the receiver grants a
transfer, its NIXL thread offers the whole grant at once to its expected writer (the
``writer`` of ``grant``), or to every peer that said Hello when it names none (a peer
that says Hello later gets the grants pending then): an approval of exactly
the grant's ranges, with the receiver's own sequence number, held in the grant table like
an Ask's approval (``GrantTable.hold``). A sender whose write fills an offered grant
exactly (its destinations, merged, are the offered ranges) posts the WRITE at once, and
its Done names the offer. A write that does not fill it - or comes before the offer -
Asks as above. In the connector the grant is made long before the producer is asked to
write, so the offer is always there first. One transfer has one writer: when the grant
completes, the other peers' offers end at once and each is told to drop its offer
(Withdraw; one a peer said it is writing with keeps its hold until that write's Done or
Cancel). When the grant ends otherwise (revoked, failed), each holder is asked to
Withdraw and its hold ends with the answer: Withdrawn for an unused offer, the Done or
Cancel of a write already made with it (``revoke_many`` asks them all before waiting on
any). A sender reads its pending notifications before each write, so it never uses an
offer whose Withdraw has already arrived. A sender still moving bytes with an offer after
posting says Begin, so the receiver polls for it and treats its death like an approved
writer's. A peer that leaves without using its offer leaves the grant to the others.

*Revoke* waits for an approved write's Done (the ``GrantTable`` drain); when it does not
come in time, the approval is dropped and the sender Nacked. A sender that already posted
its WRITE can still land the bytes: a one-sided write cannot be recalled.

*Close* releases, in order: transfer handles, prepared descriptor lists, remote agents,
memory registrations, the doorbell, then the agent. A transport left open is closed at
interpreter exit (a NIXL call cut short by interpreter shutdown aborts the process).
"""

from __future__ import annotations

import atexit
import concurrent.futures as cf
import functools
import itertools
import logging
import os
import socket
import threading
import time
import uuid
import weakref
from typing import Any, Literal, Sequence

from pdfabric.errors import (
    ConnectError,
    FrameError,
    PeerGone,
    RegistrationError,
    StalePeer,
    TransportClosed,
    TransportError,
)
from pdfabric.memory import Region

from . import _nixl_wire as w
from ._nixl_agent import (
    NIXL_ERRORS,
    AgentThread,
    Doorbell,
    PidWatch,
    as_text,
    empty_reg_list,
    make_agent,
    memory_kind,
    nixl_error,
    proc_start,
    why,
)
from ._nixl_dlists import MEM_NAMES, DlistCache, RegSet
from ._nixl_peer import Peer, Write
from ._nixl_receiver import ReceiverRole
from ._nixl_sender import CODE_ERRORS, SenderRole
from ._plan import coalesce_plan, dest_segments
from ._state import GrantReceiver, GrantTable, MemoryTable
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

__all__ = ["NixlTransport"]

log = logging.getLogger("pdfabric.transports")

HOT_S = 50e-6  # poll interval while a transfer or an answer is outstanding
WARM_S = 5e-3  # ... while grants are open (an Ask may come any moment)
APPROVED_S = 1e-3  # ... while a same-host peer writes into us (it rings when done)
IDLE_S = 50e-3  # ... otherwise
HEARTBEAT_S = 1.0
_LIVENESS_S = 0.1
_JOIN_S = 5.0
_OPEN: "weakref.WeakSet[NixlTransport]" = weakref.WeakSet()


@functools.cache
def _close_at_exit() -> None:
    """A transport its owner did not close is closed before the interpreter stops its
    thread: a NIXL call cut short by interpreter shutdown aborts the process."""
    atexit.register(lambda: [t.close() for t in list(_OPEN)])


class NixlTransport(SenderRole, ReceiverRole, GrantReceiver, Transport):
    """Push transport over a NIXL agent (UCX backend); DRAM or VRAM; any hosts."""

    name = "nixl"
    capabilities = Capabilities(push=True, device_memory=True, one_sided=True)

    def __init__(
        self,
        *,
        backend: Literal["UCX"] = "UCX",
        progress_thread: bool = False,
        ucx_error_handling: Literal["none", "peer"] = "none",
        connect_timeout_s: float = 5.0,
        transfer_timeout_s: float = 30.0,
        peer_timeout_s: float = 10.0,
    ) -> None:
        if backend != "UCX":
            raise ValueError(f"backend must be 'UCX', got {backend!r}")
        if ucx_error_handling not in ("none", "peer"):
            raise ValueError(f"ucx_error_handling must be 'none' or 'peer', got {ucx_error_handling!r}")
        self.connect_timeout_s = connect_timeout_s
        self.transfer_timeout_s = transfer_timeout_s
        self.peer_timeout_s = peer_timeout_s
        self._incarnation = uuid.uuid4().hex
        self._agent_name = f"pdfabric-{self._incarnation}"
        self._agent: Any = make_agent(self._agent_name, backend, progress_thread, ucx_error_handling)
        self._mem = MemoryTable(self.name)
        self._grants = GrantTable(self.name, self._mem, kill_conn=self._kill_conn, on_ended=self._grant_ended)
        self._closed = False
        self._lock = threading.Lock()
        self._by_id: dict[PeerId, Peer] = {}
        self._peers: dict[str, Peer] = {}  # by agent name; the NIXL thread's
        self._pids = PidWatch()
        self._bell = Doorbell(self._incarnation)
        self._reg_rows: list[tuple[int, int, int, int]] = []
        self._reg_descs: list[Any] = []
        self._regset = RegSet.from_rows([], 0)
        self._local_lists = DlistCache(self._agent, "")
        self._inflight: list[Write] = []
        self._stash: list[tuple[str, list[bytes]]] = []  # notifications read by _flush
        self._approved_tids: set[str] = set()
        self._seq = itertools.count(1)
        self._offers: dict[str, dict[int, Peer]] = {}  # the NIXL thread's
        self._offer_seq = itertools.count(1)
        self.stats = {"asks": 0, "offers_used": 0}  # writes that asked / went on an offer
        self._proc = (self._pids.namespace, proc_start(os.getpid()) or 0)
        self._info = self._make_info()
        self._next_check = 0.0
        self._io = AgentThread("pdfabric-nixl", self._step, self._poll_cap, HOT_S, self._bell)
        self._io.start()
        _OPEN.add(self)
        _close_at_exit()

    # -- memory ---------------------------------------------------------------------------
    def register(self, regions: Sequence[Region]) -> None:
        self._check_open()
        for r in regions:
            if r.length <= 0:
                raise RegistrationError(f"cannot register an empty region at {r.addr:#x}", transport=self.name)
        self._io.call(lambda: self._register(list(regions)))
        self._mem.add(regions)

    def _register(self, regions: list[Region]) -> None:
        for r in regions:
            kind, dev = memory_kind(r.addr)
            if (r.addr, r.length, kind, dev) in self._reg_rows:
                continue  # registered already: a second NIXL descriptor of the same bytes would
                # make peers refuse our metadata (NIXL_ERR_NOT_ALLOWED on VRAM: other keys)
            try:
                descs = self._agent.register_memory([(r.addr, r.length, dev, "")], MEM_NAMES[kind])
            except NIXL_ERRORS as e:
                raise RegistrationError(
                    f"NIXL could not register {r.length} bytes of {MEM_NAMES[kind]} at {r.addr:#x}: {why(e)}",
                    transport=self.name,
                ) from e
            self._reg_descs.append(descs)
            self._reg_rows.append((r.addr, r.length, kind, dev))
        self._regset = RegSet.from_rows(self._reg_rows, len(self._reg_rows))
        self._info = self._make_info()

    def _make_info(self) -> bytes:
        info = w.PeerInfo(w.NIXL_WIRE_VERSION, self._agent_name, self._agent.get_agent_metadata(),
                          len(self._reg_rows), list(self._reg_rows), *self._proc, self._bell.name, self._bell.netns)  # fmt: skip
        return w.encode_info(info)

    # -- peers ----------------------------------------------------------------------------
    def descriptor(self) -> PeerDescriptor:
        from .registry import local_host_id

        return PeerDescriptor(self.name, self._incarnation, socket.gethostname(), os.getpid(),
                              f"nixl:{self._agent_name}", local_host_id(), self._info)  # fmt: skip

    def connect(self, peer: PeerDescriptor, timeout: float | None = None) -> PeerId:
        self._check_open()
        info = self._check_descriptor(peer)
        pid = PeerId(peer.incarnation)
        with self._lock:
            known = self._by_id.get(pid)
        if known is not None and known.gone is None and known.hello is not None and known.hello.done():
            return pid
        limit = self.connect_timeout_s if timeout is None else timeout
        p: Peer = self._io.call(lambda: self._open(peer, info))
        assert p.hello is not None
        try:
            p.hello.result(limit)
        except cf.TimeoutError:
            self._io.submit(lambda: self._gone(p, ConnectError(f"no answer to hello within {limit:.3g}s", peer=p.label, transport=self.name)))
            raise ConnectError(
                f"agent {info.agent} did not answer the handshake within {limit:.3g}s "
                "(not a pdfabric nixl transport, or unreachable)", peer=p.label, transport=self.name,
            ) from None  # fmt: skip
        return pid

    def _check_descriptor(self, peer: PeerDescriptor) -> w.PeerInfo:
        from .registry import local_host_id

        if peer.transport != self.name:
            raise ConnectError(f"descriptor is for transport {peer.transport!r}, not {self.name!r}", transport=self.name)
        try:
            info = w.decode_info(peer.extra)
        except FrameError as e:
            raise ConnectError(f"not a nixl descriptor: {e.message}", transport=self.name) from None
        if info.version != w.NIXL_WIRE_VERSION:
            raise ConnectError(f"peer speaks nixl wire version {info.version}, this side {w.NIXL_WIRE_VERSION}", transport=self.name)
        if info.agent != f"pdfabric-{peer.incarnation}":
            raise ConnectError(f"descriptor names agent {info.agent!r} but incarnation {peer.incarnation[:8]}; "
                               "it was not made by one nixl transport", transport=self.name)  # fmt: skip
        if info.agent == self._agent_name:
            raise ConnectError("a nixl transport cannot connect to itself", transport=self.name)
        if peer.host_id == local_host_id() and info.pidns == self._proc[0] and proc_start(peer.pid) != info.start:
            raise StalePeer(f"peer process {peer.pid} has exited since this descriptor was made; fetch its descriptor "
                            "again", peer=f"{peer.incarnation[:8]}@pid{peer.pid}", transport=self.name)  # fmt: skip
        return info

    def _open(self, desc: PeerDescriptor, info: w.PeerInfo) -> Peer:
        label = f"{desc.incarnation[:8]}@pid{desc.pid}"
        p = self._peers.get(info.agent)
        live = p is not None and p.gone is None and p.hello is not None
        if live and (not p.hello.done() or p.hello.exception() is None):  # type: ignore[union-attr]
            return p  # type: ignore[return-value]  # connected, or a handshake under way
        try:
            loaded = as_text(self._agent.add_remote_agent(info.metadata))
        except NIXL_ERRORS as e:
            raise ConnectError(f"cannot load the peer's NIXL metadata: {why(e)}", peer=label, transport=self.name) from e
        if loaded != info.agent:
            if loaded not in self._peers:
                self._forget_agent(loaded)
            raise ConnectError(f"descriptor names agent {info.agent!r} but its metadata is agent {loaded!r}", peer=label, transport=self.name)
        if p is None or p.gone is not None:
            p = Peer(info.agent, label, time.monotonic(), bell=self._bell_of(desc.host_id, info.netns, info.bell))
            self._peers[info.agent] = p
            self._watch(p, desc.pid, desc.host_id, info.pidns, info.start)
        p.regs, p.lists = RegSet.from_rows(info.regions, info.epoch), p.lists or DlistCache(self._agent, info.agent)
        p.hello, p.last_heard = cf.Future(), time.monotonic()
        with self._lock:
            self._by_id[PeerId(desc.incarnation)] = p
        from .registry import local_host_id

        hello = w.Hello(w.NIXL_WIRE_VERSION, desc.incarnation, self._incarnation,
                        self._agent.get_partial_agent_metadata(empty_reg_list(), True), os.getpid(), local_host_id(),
                        *self._proc, self._bell.name, self._bell.netns, p.regs.epoch)  # fmt: skip
        self._send(p, hello)
        return p

    def _bell_of(self, host_id: str, netns: str, bell: str) -> str:
        """A peer's doorbell when we can ring it (same host, same network namespace)."""
        from .registry import local_host_id

        return bell if host_id == local_host_id() and netns == self._bell.netns else ""

    def _watch(self, p: Peer, pid: int, host_id: str, pidns: str, start: int) -> None:
        """Watch a same-host peer's process (its exit shows up in ``_liveness``)."""
        from .registry import local_host_id

        if host_id != local_host_id() or pidns != self._pids.namespace:
            return
        p.pidfd = self._pids.add(p, pid, start)
        if p.pidfd is None:
            self._gone(p, PeerGone(f"peer process {pid} has exited", peer=p.label, transport=self.name))

    # -- sender ---------------------------------------------------------------------------
    def write(self, peer: PeerId, plan: TransferPlan, notify: bytes = b"") -> TransferHandle:
        self._check_open()
        with self._lock:
            p = self._by_id.get(peer)
        if p is None:
            raise ConnectError(f"not connected to peer {peer}; call connect() first", transport=self.name)
        if p.gone is not None:
            raise PeerGone(f"peer is gone: {p.gone.message}", transfer_id=plan.transfer_id, peer=p.label, transport=self.name)
        if len(notify) > MAX_NOTIFY_BYTES:
            raise ValueError(f"notify payload of {len(notify)} bytes is over {MAX_NOTIFY_BYTES}")
        pieces = coalesce_plan(plan)
        self._mem.check(pieces[:, 0], pieces[:, 2])  # RegistrationError for unregistered sources
        dests = dest_segments(pieces, plan.transfer_id)  # ValueError for overlapping destinations
        tid = plan.transfer_id
        handle = TransferHandle(tid, peer, plan.nbytes, self.name)
        with self._lock:
            if tid in p.tids:
                raise ValueError(f"transfer {tid} to this peer is already in flight")
            p.tids.add(tid)
        wr = Write(next(self._seq), handle, p, pieces, w.pack_segments(pieces[:, 1:3]), notify, dests)
        self._io.submit(lambda: self._ask(wr))
        if self._closed and not self._io.thread.is_alive():  # close() finished before it saw this write
            self._finish(wr, TransportClosed("transport closed", transfer_id=tid, transport=self.name))
        return handle

    # -- the NIXL thread ------------------------------------------------------------------
    def _step(self) -> bool:
        busy = self._pump()
        busy |= self._check_xfers()
        now = time.monotonic()
        if now >= self._next_check:
            self._liveness(now)
            self._next_check = now + _LIVENESS_S
        return busy

    def _poll_cap(self) -> float:
        """How long the NIXL thread may sleep: peers with a doorbell ring when they answer;
        transfers in flight and answers owed by peers without one are polled for."""
        if self._inflight:
            return HOT_S  # UCX progresses them only when polled
        peers = self._peers.values()
        if any(p.owes() and not p.bell for p in peers):
            return HOT_S
        if any(a.writing or a.withdrawing for p in peers for a in p.approved.values()):
            return APPROVED_S  # its WRITE may need our progress (UCX without CMA); Done rings
        if any(not p.bell and p.said_hello for p in peers) and self._grants.pending():
            return WARM_S  # a peer that cannot ring may Ask any moment
        return IDLE_S

    def _pump(self) -> bool:
        self._flush()
        batch, self._stash = self._stash, []
        for agent, msgs in batch:
            for raw in msgs:
                self._on_notif(agent, raw)
        return bool(batch)

    def _flush(self) -> None:
        """Progress the UCX worker (what we just sent leaves now); notifications that came
        meanwhile are kept for ``_pump``, so no handler ever runs inside another."""
        self._stash.extend(self._agent.get_new_notifs().items())

    def _on_notif(self, agent: str, raw: bytes) -> None:
        try:
            m = w.decode(raw)
        except FrameError as e:
            self._grants.record(Rejection("", agent, e.message))
            return
        if isinstance(m, w.Hello):
            self._on_hello(agent, m)
            return
        p = self._peers.get(agent)
        if p is None or p.gone is not None:
            if not isinstance(m, (w.Bye, w.Pong)):
                self._grants.record(Rejection(getattr(m, "tid", ""), agent, f"{type(m).__name__} from an agent that is not a peer"))
            return
        p.last_heard = time.monotonic()
        if isinstance(m, w.Ask):
            self._on_ask(p, m)
        elif isinstance(m, w.Done):
            self._on_done(p, m)
        elif isinstance(m, w.AskOk):
            self._on_ask_ok(p, m)
        elif isinstance(m, (w.Nack, w.AskNo)):
            self._on_answer(p, m)
        elif isinstance(m, w.Cancel):
            self._on_cancel(p, m)
        elif isinstance(m, w.Offer):
            self._on_offer(p, m)
        elif isinstance(m, w.Withdraw):
            self._on_withdraw(p, m)
        elif isinstance(m, w.Withdrawn):
            self._on_withdrawn(p, m)
        elif isinstance(m, w.Begin):
            self._on_begin(p, m)
        elif isinstance(m, w.HelloOk) and p.hello is not None and not p.hello.done():
            p.hello.set_result(None)
        elif isinstance(m, w.HelloNo) and p.hello is not None and not p.hello.done():
            cls = CODE_ERRORS.get(m.code, ConnectError)
            p.hello.set_exception(cls(f"peer refused the handshake: {m.reason}", peer=p.label, transport=self.name))
        elif isinstance(m, w.Ping):
            self._send(p, w.Pong())
        elif isinstance(m, w.Bye):
            self._gone(p, PeerGone(f"peer closed: {m.reason}", peer=p.label, transport=self.name))

    def _send(self, p: Peer, m: Any, raw: bytes = b"") -> bool:
        """Send a message (or ``raw`` bytes) to ``p``; a failure means the peer is gone."""
        try:
            self._agent.send_notif(p.agent, raw or w.encode(m))
            self._flush()
            self._ring(p)
            return True
        except NIXL_ERRORS as e:
            err = nixl_error(e, "cannot reach the peer")
            self._gone(p, PeerGone(err.message, peer=p.label, transport=self.name))
            return False

    def _ring(self, p: Peer) -> None:
        if p.bell:
            self._bell.ring(p.bell)

    def _liveness(self, now: float) -> None:
        for p in self._pids.exited():
            assert isinstance(p, Peer)
            self._gone(p, PeerGone("peer process exited", peer=p.label, transport=self.name))
        for p in list(self._peers.values()):
            if p.gone is not None or not p.owes():
                continue
            quiet = now - p.last_heard
            if quiet > self.peer_timeout_s:
                self._gone(p, PeerGone(f"no word from peer for {quiet:.1f}s", peer=p.label, transport=self.name))
            elif quiet > HEARTBEAT_S and now - p.last_ping > HEARTBEAT_S:
                p.last_ping = now
                self._send(p, w.Ping())

    def _gone(self, p: Peer, err: TransportError) -> None:
        """Fail everything that waits on ``p``, then forget the agent."""
        if p.gone is not None:
            return
        p.gone = err
        if p.hello is not None and not p.hello.done():
            p.hello.set_exception(err)
        for wr in list(p.writes.values()):
            self._release_write(wr)
            self._finish(wr, type(err)(f"{err.message} (mid-transfer)", transfer_id=wr.handle.transfer_id, peer=p.label, transport=self.name))
        p.writes.clear()
        for seq, a in p.approved.items():
            self._forget_offer(a.tid, seq)
            self._grants.end_write(a.token, p, 0)
            if a.writing:  # an offer it never took up leaves the grant to other writers
                self._approved_tids.discard(a.tid)
                self._grants.fail(a.tid, PeerGone(f"{err.message} (mid-transfer)", transfer_id=a.tid, peer=p.label, transport=self.name))
        p.approved.clear()
        p.offers.clear()
        self._unwatch(p)
        if not any(wr.peer is p for wr in self._inflight):
            self._drop(p)

    def _drop(self, p: Peer) -> None:
        """Release a gone peer's prepared lists and its remote agent (none of its writes is
        in flight)."""
        if self._peers.get(p.agent) is p:
            del self._peers[p.agent]
            self._forget_agent(p.agent)
        if p.lists is not None:
            p.lists.close()
            p.lists = None

    def _unwatch(self, p: Peer) -> None:
        if p.pidfd is not None:
            self._pids.remove(p.pidfd)
            p.pidfd = None

    def _forget_agent(self, agent: str) -> None:
        try:
            self._agent.remove_remote_agent(agent)
        except NIXL_ERRORS as e:
            log.debug("nixl: removing agent %s: %s", agent, why(e))

    # -- lifecycle ------------------------------------------------------------------------
    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        _OPEN.discard(self)
        self._grants.close()
        if not self._io.stop(self._shutdown, _JOIN_S):
            log.error("nixl: the NIXL thread did not stop within %ss; the agent is left alive", _JOIN_S)
            return
        self._bell.close()
        with self._lock:
            self._by_id.clear()
        self._peers.clear()
        self._local_lists = DlistCache(None, "")
        self._agent = None  # the agent goes last (its UCX context and workers)
        self._mem.clear()

    def _shutdown(self) -> None:
        """Release in order: transfers, prepared lists, remote agents, registrations."""
        closed = TransportClosed("transport closed", transport=self.name)
        for p in list(self._peers.values()):
            if p.gone is None:
                try:
                    self._agent.send_notif(p.agent, w.encode(w.Bye("transport closed")))
                except NIXL_ERRORS:
                    pass
        inflight, self._inflight = self._inflight, []
        for wr in inflight:
            self._release_write(wr)
        for p in list(self._peers.values()):
            self._gone(p, closed)
        with self._lock:
            peers = list(self._by_id.values())
        for p in peers:
            self._drop(p)
        self._local_lists.close()
        for descs in self._reg_descs:
            try:
                self._agent.deregister_memory(descs)
            except NIXL_ERRORS as e:
                log.warning("nixl: deregistering memory failed: %s", why(e))
        self._reg_descs.clear()

    def alive_threads(self) -> list[str]:
        """Names of this transport's threads still running (leak checks)."""
        return [self._io.thread.name] if self._io.thread.is_alive() else []
