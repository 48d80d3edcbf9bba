"""Connection machinery shared by the socket-based transports (``tcp``, ``shm``).

Theory of operation
-------------------
Receiver: one listening socket; one thread per accepted connection. A connection starts
with HELLO (wire version + the receiver incarnation the sender expects; a mismatch is a
``StalePeer``), then carries DATA/PULL frames for any number of transfers, each stream's
part closed by END. The subclass moves the bytes of a DATA/PULL frame; everything else -
grants, accounting, ACK/ERR - is here. A refused or malformed frame is answered with ERR,
then the connection is drained (not read into any grant) and closed.

Sender: per peer, ``streams`` connections, each with a sender thread (a queue of jobs,
``sendmsg`` of frames whose payload views point straight at registered memory) and a
reader thread (ACK/ERR). A write is split across streams when it is large; its handle
is DONE when every stream it used was acknowledged. A dead stream fails the transfers it
carried with ``PeerGone`` and is redialed on the next write.
"""

from __future__ import annotations

import logging
import queue
import socket
import threading
import time
import uuid
from abc import abstractmethod
from dataclasses import dataclass, field

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

from . import _wire as w
from ._iov import send_iov
from ._plan import check_no_overlap, coalesce_plan, split_streams
from ._state import GrantReceiver, GrantTable, MemoryTable
from .base import (
    MAX_NOTIFY_BYTES,
    PeerDescriptor,
    PeerId,
    Rejection,
    Status,
    TransferHandle,
    TransferPlan,
    Transport,
)

__all__ = ["StreamTransport", "coalesce_plan", "check_no_overlap", "split_streams"]  # helpers re-exported

log = logging.getLogger("pdfabric.transports")

# A part of a transfer is an (n, 3) uint64 array of pieces: [src addr, dst addr, length].
_JOIN_S = 5.0
_SMALL_PIECES = 8
_DRAIN_S = 1.0


@dataclass(eq=False)
class _Pending:
    handle: TransferHandle
    remaining: int


@dataclass(eq=False)
class _Stream:
    sock: socket.socket
    label: str
    jobs: "queue.SimpleQueue[tuple | None]" = field(default_factory=queue.SimpleQueue)
    inflight: set[str] = field(default_factory=set)
    dead: TransportError | None = None
    threads: list[threading.Thread] = field(default_factory=list)
    send_lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.reader = w.FrameReader(self.sock)

    def kill(self, error: TransportError) -> None:
        if self.dead is None:
            self.dead = error
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


@dataclass(eq=False)
class _Link:
    desc: PeerDescriptor
    label: str
    streams: list[_Stream | None]
    pending: dict[str, _Pending] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)


class StreamTransport(GrantReceiver, Transport):
    """Base of ``tcp`` and ``shm``; subclasses supply sockets and the DATA/PULL codec."""

    data_frame: w.FrameType
    min_stream_bytes = 1 << 20
    inline_bytes = 16 << 10

    def __init__(self, *, streams: int, connect_timeout_s: float, transfer_timeout_s: float) -> None:
        if streams < 1:
            raise ValueError(f"streams must be >= 1, got {streams}")
        self.streams = streams
        self.connect_timeout_s = connect_timeout_s
        self.transfer_timeout_s = transfer_timeout_s
        self._incarnation = uuid.uuid4().hex
        self._mem = MemoryTable(self.name)
        self._grants = GrantTable(self.name, self._mem, kill_conn=self._kill_conn)
        self._links: dict[PeerId, _Link] = {}
        self._links_lock = threading.Lock()
        self._conns: dict[int, socket.socket] = {}
        self._conns_lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._closed = False
        self._listener, self._endpoint = self._listen()
        self._spawn(self._accept_loop, "accept")

    # -- subclass hooks ------------------------------------------------------------------
    @abstractmethod
    def _listen(self) -> tuple[socket.socket, str]: ...

    @abstractmethod
    def _dial(self, peer: PeerDescriptor, timeout: float) -> socket.socket: ...

    @abstractmethod
    def _encode(self, tid: bytes, part: np.ndarray, end: bytes) -> tuple[np.ndarray, list[object]]:
        """The iovecs of every frame that moves ``part``, then the END frame ``end``;
        plus the objects that must stay alive while they are sent."""

    def _encode_small(self, tid: bytes, part: np.ndarray, end: bytes) -> list[bytes | memoryview]:
        """Buffers for a part of at most ``_SMALL_PIECES`` pieces (one ``sendmsg``)."""
        iov, keep = self._encode(tid, part, end)
        return [memoryview(k) for k in keep]  # default: subclasses with payload override

    @abstractmethod
    def _receive(self, ctx: "_ConnCtx", tid: str, count: int, body_len: int) -> None:
        """Handle one DATA/PULL frame whose header was read; must use begin/end_write."""

    def _peer_pid(self, sock: socket.socket, claimed: int) -> int:
        return claimed

    # -- plumbing ------------------------------------------------------------------------
    def _spawn(self, target, name: str, *args) -> threading.Thread:  # type: ignore[no-untyped-def]
        t = threading.Thread(target=target, args=args, name=f"pdfabric-{self.name}-{name}", daemon=True)
        t.start()
        if len(self._threads) > 64:
            self._threads = [x for x in self._threads if x.is_alive()]
        self._threads.append(t)
        return t

    def descriptor(self) -> PeerDescriptor:
        from .registry import local_host_id

        return PeerDescriptor(
            transport=self.name,
            incarnation=self._incarnation,
            host=self._endpoint.rsplit(":", 1)[0],
            pid=_getpid(),
            endpoint=self._endpoint,
            host_id=local_host_id(),
        )

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            if self._closed:
                sock.close()
                return
            self._spawn(self._serve, "conn", sock)

    def _kill_conn(self, conn: object) -> None:
        with self._conns_lock:
            sock = self._conns.get(id(conn))
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _serve(self, sock: socket.socket) -> None:
        ctx = _ConnCtx(sock, peer="?", pid=0, reader=w.FrameReader(sock))
        with self._conns_lock:
            self._conns[id(ctx)] = sock
        why = "peer closed the connection"
        try:
            if self._hello(ctx):
                self._serve_frames(ctx)
        except (GrantRefused, FrameError) as e:
            why = str(e)
            if isinstance(e, FrameError):
                self._grants.record(Rejection("", ctx.peer, e.message))
            self._refuse(ctx, w.ErrCode.REFUSED if isinstance(e, GrantRefused) else w.ErrCode.FRAME, e)
        except (TransportError, OSError) as e:
            why = str(e) or type(e).__name__
            if isinstance(e, TransportError) and not isinstance(e, PeerGone):
                self._send_err(ctx, e.transfer_id or "", w.ErrCode.INTERNAL, e.message)
        finally:
            self._grants.conn_lost(ctx, ctx.peer, why)
            with self._conns_lock:
                self._conns.pop(id(ctx), None)
            sock.close()

    def _hello(self, ctx: "_ConnCtx") -> bool:
        ctx.sock.settimeout(self.connect_timeout_s)
        hdr = ctx.reader.header()
        if hdr is None:
            return False
        kind, _, _, body_len = hdr
        if kind is not w.FrameType.HELLO:
            raise FrameError(f"expected HELLO, got {kind.name}")
        version, expected, theirs, pid = w.Hello.unpack(ctx.reader.read(body_len))
        ctx.peer, ctx.pid = f"{theirs[:8]}@pid{pid}", self._peer_pid(ctx.sock, pid)
        if version != w.WIRE_VERSION:
            self._send_err(ctx, "", w.ErrCode.VERSION, f"wire version {version}, this side speaks {w.WIRE_VERSION}")
            return False
        if expected != self._incarnation:
            msg = f"descriptor is stale: it names incarnation {expected[:8]}, this transport is {self._incarnation[:8]} (the peer restarted; fetch its descriptor again)"
            self._send_err(ctx, "", w.ErrCode.STALE, msg)
            return False
        ctx.sock.sendall(w.header(w.FrameType.HELLO_OK, b"", 0, 0))
        ctx.sock.settimeout(None)
        return True

    def _serve_frames(self, ctx: "_ConnCtx") -> None:
        while not self._closed:
            hdr = ctx.reader.header()
            if hdr is None:
                return
            kind, tid, count, body_len = hdr
            if kind is self.data_frame:
                self._receive(ctx, tid, count, body_len)
            elif kind is w.FrameType.END:
                self._on_end(ctx, tid, ctx.reader.read(body_len))
            else:
                raise FrameError(f"unexpected {kind.name} frame from a sender")

    def _on_end(self, ctx: "_ConnCtx", tid: str, body: bytes) -> None:
        if len(body) < w.END_BODY.size:
            raise FrameError("END frame too short", transfer_id=tid)
        stream_bytes, total, nstreams = w.END_BODY.unpack_from(body)
        err = self._grants.stream_end(tid, ctx, stream_bytes, nstreams, total, body[w.END_BODY.size :])
        if err is None:
            ctx.sock.sendall(w.header(w.FrameType.ACK, tid.encode(), 0, 0))
        else:
            code = w.ErrCode.ABORTED if isinstance(err, TransferAborted) else w.ErrCode.FRAME
            self._send_err(ctx, tid, code, err.message, closing=False)

    def _send_err(self, ctx: "_ConnCtx", tid: str, code: w.ErrCode, message: str, closing: bool = True) -> None:
        """ERR frame; ``count`` = 1 tells the sender this connection closes after it."""
        body = bytes([code]) + message.encode()[: w.MAX_SMALL_BODY - 1]
        try:
            ctx.sock.sendall(w.header(w.FrameType.ERR, tid.encode(), int(closing), len(body)) + body)
        except OSError:
            pass

    def _refuse(self, ctx: "_ConnCtx", code: w.ErrCode, err: TransportError) -> None:
        """ERR, then drain what the sender still pushes (into scratch, never a grant)."""
        self._send_err(ctx, err.transfer_id or "", code, err.message)
        try:
            ctx.sock.shutdown(socket.SHUT_WR)
            ctx.sock.settimeout(_DRAIN_S)
            scratch = bytearray(1 << 16)
            deadline = time.monotonic() + _DRAIN_S
            while time.monotonic() < deadline and ctx.sock.recv_into(scratch):
                pass
        except OSError:
            pass

    # -- sender --------------------------------------------------------------------------
    def connect(self, peer: PeerDescriptor, timeout: float | None = None) -> PeerId:
        self._check_open()
        if peer.transport != self.name:
            raise ConnectError(f"descriptor is for transport {peer.transport!r}, not {self.name!r}", transport=self.name)
        pid = PeerId(f"{peer.incarnation}")
        with self._links_lock:
            link = self._links.get(pid)
            if link is None:
                link = _Link(peer, f"{peer.endpoint}#{peer.incarnation[:8]}", [None] * self.streams)
                self._links[pid] = link
        # all streams now, so an unreachable or refusing peer surfaces here, not mid-write
        self._ensure_streams(link, self.streams, self.connect_timeout_s if timeout is None else timeout)
        return pid

    def _ensure_streams(self, link: _Link, k: int, timeout: float) -> list[_Stream]:
        with link.lock:
            self._check_open()
            out = []
            for i in range(k):
                s = link.streams[i]
                if s is None or s.dead is not None:
                    s = self._open_stream(link, timeout)
                    link.streams[i] = s
                out.append(s)
            return out

    def _open_stream(self, link: _Link, timeout: float) -> _Stream:
        desc = link.desc
        try:
            sock = self._dial(desc, timeout)
        except OSError as e:
            raise ConnectError(f"cannot reach {desc.endpoint}: {e}", peer=link.label, transport=self.name) from e
        try:
            sock.settimeout(timeout)
            body = w.Hello.pack(desc.incarnation, self._incarnation, _getpid())
            sock.sendall(w.header(w.FrameType.HELLO, b"", 0, len(body)) + body)
            hdr = w.recv_header(sock)
            if hdr is None:
                raise ConnectError("peer closed during handshake", peer=link.label, transport=self.name)
            kind, _, _, body_len = hdr
            reply = bytes(w.recv_exact(sock, body_len))
            if kind is w.FrameType.ERR:
                raise w.error_from_code(reply[0], reply[1:].decode(errors="replace"), tid=None, peer=link.label, transport=self.name)
            if kind is not w.FrameType.HELLO_OK:
                raise ConnectError(f"unexpected {kind.name} in handshake", peer=link.label, transport=self.name)
            sock.settimeout(None)
        except (OSError, TransportError) as e:
            sock.close()
            if isinstance(e, (ConnectError, StalePeer)):
                raise
            if isinstance(e, TransportError) and not isinstance(e, PeerGone):
                raise
            raise ConnectError(f"handshake with {desc.endpoint} failed: {e}", peer=link.label, transport=self.name) from e
        if self._closed:
            sock.close()
            raise TransportClosed("transport closed", transport=self.name)
        stream = _Stream(sock, link.label)
        stream.threads = [
            self._spawn(self._send_loop, "send", link, stream),
            self._spawn(self._read_loop, "read", link, stream),
        ]
        return stream

    def write(self, peer: PeerId, plan: TransferPlan, notify: bytes = b"") -> TransferHandle:
        self._check_open()
        link = self._links.get(peer)
        if link is None:
            raise ConnectError(f"not connected to peer {peer}; call connect() first", transport=self.name)
        if len(notify) > MAX_NOTIFY_BYTES:
            raise ValueError(f"notify payload of {len(notify)} bytes is over {MAX_NOTIFY_BYTES}")
        pieces = coalesce_plan(plan)
        self._mem.check(pieces[:, 0], pieces[:, 2])  # RegistrationError for unregistered sources
        check_no_overlap(pieces, plan.transfer_id)
        total = plan.nbytes
        parts = split_streams(pieces, self.streams, self.min_stream_bytes, total)
        streams = self._ensure_streams(link, len(parts), self.connect_timeout_s)
        tid = plan.transfer_id
        handle = TransferHandle(tid, peer, total, self.name)
        with link.lock:
            if tid in link.pending:
                raise ValueError(f"transfer {tid} to this peer is already in flight")
            link.pending[tid] = _Pending(handle, len(parts))
        for stream, part in zip(streams, parts):
            job = (tid, part, len(parts), total, notify)
            # Small parts go out on the caller's thread when the stream is idle: it saves a
            # thread hand-off (~50-100 us) and a small sendmsg does not block.
            # Inline only when nothing is in flight on the stream (its socket buffer is then
            # empty, so a send of <= 16 KiB cannot block).
            idle = not stream.inflight
            stream.inflight.add(tid)
            if (
                idle
                and (total if len(parts) == 1 else int(part[:, 2].sum())) <= self.inline_bytes
                and stream.jobs.empty()
                and stream.send_lock.acquire(blocking=False)
            ):
                try:
                    self._send_job(link, stream, job)
                finally:
                    stream.send_lock.release()
            else:
                stream.jobs.put(job)
                if stream.dead is not None or not stream.threads[0].is_alive():
                    self._fail_queued(link, stream, "stream closed")
        if self._closed:  # close() ran while we registered: it may not have seen this transfer
            self._fail(link, tid, TransportClosed("transport closed", transfer_id=tid, transport=self.name))
        return handle

    def _send_loop(self, link: _Link, stream: _Stream) -> None:
        while True:
            job = stream.jobs.get()
            if job is None:
                return
            with stream.send_lock:
                self._send_job(link, stream, job)

    def _send_job(self, link: _Link, stream: _Stream, job: tuple) -> None:  # type: ignore[type-arg]
        """Put one stream's part of a transfer on the wire (caller holds send_lock)."""
        tid, part, nparts, total, notify = job
        p = link.pending.get(tid)
        if p is None or p.handle.status.finished:
            return
        if stream.dead is not None:
            why = stream.dead.message
            self._fail(link, tid, PeerGone(f"connection closed: {why}", transfer_id=tid, peer=link.label, transport=self.name))
            return
        tid_b = tid.encode()
        body = w.END_BODY.pack(int(part[:, 2].sum()), total, nparts) + notify
        end = w.header(w.FrameType.END, tid_b, 0, len(body)) + body
        try:
            if len(part) <= _SMALL_PIECES:
                # few pieces: Python's sendmsg over views of registered memory is cheaper
                # than building iovec arrays (still no copy of the payload)
                w.send_buffers(stream.sock, self._encode_small(tid_b, part, end))
            else:
                iov, keep = self._encode(tid_b, part, end)
                send_iov(stream.sock.fileno(), iov)
                del keep
        except OSError as e:
            err = PeerGone(f"send failed: {e}", transfer_id=tid, peer=link.label, transport=self.name)
            stream.kill(err)
            self._fail(link, tid, err)

    def _read_loop(self, link: _Link, stream: _Stream) -> None:
        why = "peer closed the connection"
        try:
            while True:
                hdr = stream.reader.header()
                if hdr is None:
                    break
                kind, tid, closing, body_len = hdr
                body = stream.reader.read(body_len)
                if kind is w.FrameType.ACK:
                    self._ack(link, stream, tid)
                elif kind is w.FrameType.ERR and body:
                    msg = body[1:].decode(errors="replace")
                    err = w.error_from_code(body[0], msg, tid=tid, peer=link.label, transport=self.name)
                    if closing and stream.dead is None:
                        stream.dead = err  # the next write redials instead of queueing here
                    self._fail(link, tid, err)
                else:
                    why = f"unexpected {kind.name} frame from receiver"
                    break
        except (OSError, TransportError) as e:
            why = str(e) or type(e).__name__
        err = stream.dead or PeerGone(f"connection lost: {why}", peer=link.label, transport=self.name)
        stream.kill(err)
        for tid in list(stream.inflight):
            self._fail(link, tid, PeerGone(f"connection lost mid-transfer: {why}", transfer_id=tid, peer=link.label, transport=self.name))
        stream.jobs.put(None)
        sender = stream.threads[0] if stream.threads else None
        if sender is not None and sender is not threading.current_thread():
            sender.join(_JOIN_S)
        self._fail_queued(link, stream, why)
        stream.sock.close()

    def _fail_queued(self, link: _Link, stream: _Stream, why: str) -> None:
        """Fail every job still queued on a stream whose sender thread is gone."""
        while True:
            try:
                job = stream.jobs.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                tid = job[0]
                self._fail(link, tid, PeerGone(f"connection lost before sending: {why}", transfer_id=tid, peer=link.label, transport=self.name))

    def _ack(self, link: _Link, stream: _Stream, tid: str) -> None:
        stream.inflight.discard(tid)
        with link.lock:
            p = link.pending.get(tid)
            if p is None:
                return
            p.remaining -= 1
            if p.remaining > 0:
                return
            del link.pending[tid]
        p.handle.resolve(Status.DONE)

    def _fail(self, link: _Link, tid: str, err: TransportError) -> None:
        with link.lock:
            p = link.pending.pop(tid, None)
        for s in link.streams:
            if s is not None:
                s.inflight.discard(tid)
        if p is not None:
            p.handle.resolve(Status.FAILED, err)

    def abort(self, handle: TransferHandle) -> None:
        """Give up on a write: its handle becomes ABORTED (bytes may still be on the wire)."""
        link = self._links.get(handle.peer)
        if link is not None:
            with link.lock:
                link.pending.pop(handle.transfer_id, None)
        handle.resolve(Status.ABORTED, TransferAborted("aborted by sender", transfer_id=handle.transfer_id, transport=self.name))

    # -- lifecycle -----------------------------------------------------------------------
    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._grants.close()
        closed = TransportClosed("transport closed", transport=self.name)
        with self._links_lock:
            links = list(self._links.values())
            self._links.clear()
        for link in links:
            for s in link.streams:
                if s is not None:
                    s.kill(closed)
                    s.jobs.put(None)
            for tid in list(link.pending):
                self._fail(link, tid, TransportClosed("transport closed", transfer_id=tid, transport=self.name))
        try:
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()
        with self._conns_lock:
            socks = list(self._conns.values())
        for sock in socks:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        deadline = time.monotonic() + _JOIN_S
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(max(0.0, deadline - time.monotonic()))
        for link in links:
            for s in link.streams:
                if s is not None:
                    s.sock.close()
        self._on_close()
        self._mem.clear()

    def _on_close(self) -> None:
        """Subclass hook after sockets and threads are gone."""

    def alive_threads(self) -> list[str]:
        """Names of this transport's threads still running (leak checks)."""
        return [t.name for t in self._threads if t.is_alive()]


@dataclass(eq=False)
class _ConnCtx:
    sock: socket.socket
    peer: str
    pid: int
    reader: w.FrameReader


def _getpid() -> int:
    import os

    return os.getpid()
