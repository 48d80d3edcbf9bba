"""The control-plane endpoint of one worker: a thread that owns every ZMQ socket.

- a ROUTER bound at ``host:port`` (producers always; consumers when a port is set)
  receives Hello/Grant/Abort/Heartbeat/Status from peers and answers on the same route;
- one DEALER per remote producer address carries this worker's own requests and
  their replies.

Other threads never touch a socket: ``send`` queues a message and wakes the thread.
Every envelope is sealed and opened by ``pdfabric.protocol.auth``; refused envelopes
are counted and dropped (a wrong secret must not crash an engine).
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
from typing import Callable

import zmq

from pdfabric.protocol.auth import Authenticator, Refused
from pdfabric.protocol.messages import Message, ProtocolError, Status, StatusReply, decode, encode
from pdfabric.errors import FabricError

__all__ = ["ControlEndpoint", "Handler", "query_status", "zmq_addr"]

log = logging.getLogger("pdfabric.connector")

#: handler(peer, message) -> replies to that peer; ``peer`` is "r:<hex id>" or "d:<addr>"
Handler = Callable[[str, Message], list[Message]]


def zmq_addr(hostport: str) -> str:
    return f"tcp://{hostport}"


class ControlEndpoint:
    def __init__(
        self,
        auth: Authenticator,
        handler: Handler,
        bind: tuple[str, int] | None,
        identity: bytes,
        on_tick: Callable[[], None] | None = None,
        tick_s: float = 0.1,
    ) -> None:
        self._auth = auth
        self._on_tick = on_tick
        self._tick_s = tick_s
        self._handler = handler
        self._identity = identity
        self._ctx = zmq.Context.instance()
        self._router: zmq.Socket | None = None
        if bind is not None:
            self._router = self._ctx.socket(zmq.ROUTER)
            self._router.setsockopt(zmq.LINGER, 0)
            self._router.setsockopt(zmq.ROUTER_HANDOVER, 1)
            host, port = bind
            if ":" in host:
                self._router.setsockopt(zmq.IPV6, 1)
                host = f"[{host}]"
            try:
                self._router.bind(f"tcp://{host}:{port}")
            except zmq.ZMQError as e:
                self._router.close(0)
                raise FabricError(f"cannot bind the control endpoint {host}:{port}: {e} (is the port in use?)") from None
        self._dealers: dict[str, zmq.Socket] = {}
        self._outbox: queue.SimpleQueue[tuple[str, Message]] = queue.SimpleQueue()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pdfabric-control", daemon=True)
        self._thread.start()

    # -- any thread ------------------------------------------------------------------
    def send(self, peer: str, msg: Message) -> None:
        self._outbox.put((peer, msg))
        try:
            self._wake_w.send(b"x")
        except (BlockingIOError, OSError):
            pass

    def close(self, timeout: float = 5.0) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        self.send("", Status())
        self._thread.join(timeout)
        self._wake_r.close()
        self._wake_w.close()

    # -- control thread --------------------------------------------------------------
    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._wake_r, zmq.POLLIN)
        if self._router is not None:
            poller.register(self._router, zmq.POLLIN)
        next_tick = time.monotonic() + self._tick_s
        try:
            while not self._stop.is_set():
                wait_ms = max(0, int((next_tick - time.monotonic()) * 1000))
                for sock, _ in poller.poll(wait_ms):
                    if sock is self._wake_r or sock == self._wake_r.fileno():  # pyzmq returns the fd
                        self._drain_wake()
                    elif sock is self._router:
                        self._recv_router()
                    else:
                        self._recv_dealer(sock)
                self._flush(poller)
                if self._on_tick is not None and time.monotonic() >= next_tick:
                    next_tick = time.monotonic() + self._tick_s
                    self._on_tick()  # timers run even while the engine is idle
                    self._flush(poller)
        except Exception:  # a bug here must be loud, not a silent dead thread
            log.exception("pdfabric: control endpoint thread crashed")
        finally:
            for s in [*self._dealers.values(), *([self._router] if self._router else [])]:
                s.close(0)

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def _flush(self, poller: zmq.Poller) -> None:
        while True:
            try:
                peer, msg = self._outbox.get_nowait()
            except queue.Empty:
                return
            if not peer or self._stop.is_set():
                continue
            frames = self._auth.seal(encode(msg))
            if peer.startswith("r:"):
                if self._router is not None:
                    self._router.send_multipart([bytes.fromhex(peer[2:]), *frames], zmq.NOBLOCK)
            else:
                self._dealer(peer[2:], poller).send_multipart(frames, zmq.NOBLOCK)

    def _dealer(self, addr: str, poller: zmq.Poller) -> zmq.Socket:
        s = self._dealers.get(addr)
        if s is None:
            s = self._ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.IDENTITY, self._identity)
            s.setsockopt(zmq.SNDHWM, 100_000)
            if addr.startswith("["):
                s.setsockopt(zmq.IPV6, 1)
            s.connect(zmq_addr(addr))
            self._dealers[addr] = s
            poller.register(s, zmq.POLLIN)
        return s

    def _recv_router(self) -> None:
        assert self._router is not None
        while True:
            try:
                frames = self._router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            ident, rest = frames[0], frames[1:]
            self._dispatch(f"r:{ident.hex()}", rest)

    def _recv_dealer(self, sock: zmq.Socket) -> None:
        addr = next((a for a, s in self._dealers.items() if s is sock), None)
        if addr is None:
            return
        while True:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._dispatch(f"d:{addr}", frames)

    def _dispatch(self, peer: str, frames: list[bytes]) -> None:
        try:
            _, body = self._auth.open(frames)
            msg = decode(body)
        except Refused as e:
            log.warning("pdfabric: refused control message from %s: %s", peer, e.message)
            return
        except (ProtocolError, FabricError) as e:
            log.warning("pdfabric: unreadable control message from %s: %s", peer, e)
            return
        try:
            replies = self._handler(peer, msg)
        except Exception:
            log.exception("pdfabric: handling %s from %s failed", type(msg).__name__, peer)
            return
        for reply in replies:
            self.send(peer, reply)


def query_status(addr: str, secret: bytes, timeout_s: float = 5.0) -> StatusReply:
    """Ask a worker's control endpoint for its counters (tests, probes, the launcher)."""
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.IDENTITY, b"status-" + os.urandom(6).hex().encode())
    auth = Authenticator(secret, "status-client")
    try:
        s.connect(zmq_addr(addr))
        s.send_multipart(auth.seal(encode(Status())))
        if not s.poll(int(timeout_s * 1000)):
            raise TimeoutError(f"no status reply from {addr} in {timeout_s:g}s")
        _, body = auth.open(s.recv_multipart())
        reply = decode(body)
        if not isinstance(reply, StatusReply):
            raise ProtocolError(f"expected a StatusReply from {addr}, got {type(reply).__name__}")
        return reply
    finally:
        s.close(0)
