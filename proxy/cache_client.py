"""Lookups on ``pdfabric cache-server`` from the proxy's event loop (zmq.asyncio).

The engines' ``RemoteCacheClient`` is blocking and maps the server's shared-memory arena;
the proxy needs neither: it only asks how many leading chunk keys are cached, possibly from
another host, for many requests at once. So this client speaks the same wire
(``pdfabric.cache.wire``) on one DEALER socket, sends a ``Hello`` once per connection
(without mapping anything), and pipelines ``Lookup``s: answers are matched to their
requests by ``seq``, so concurrent requests do not wait for each other.

Contract: ``lookup`` never raises for a cache server that is down, slow or refusing; it
answers ``None`` by the caller's deadline (counted in ``counters``, logged at most once per
``warn_every_s``), and for ``retry_after_s`` afterwards answers ``None`` at once without
asking. One event loop only; ``close()`` once, from that loop.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence

import msgspec
import zmq
import zmq.asyncio

from pdfabric.cache import wire

__all__ = ["LookupClient"]

log = logging.getLogger("pdfabric.proxy")


class LookupClient:
    def __init__(self, address: str, *, name: str = "proxy", retry_after_s: float = 2.0,
                 warn_every_s: float = 30.0) -> None:
        self.address, self.name = address, name
        self.retry_after_s, self.warn_every_s = retry_after_s, warn_every_s
        self.counters: Counter[str] = Counter()
        self._ctx: zmq.asyncio.Context | None = None  # made on the first lookup, ended by close()
        self._sock: zmq.asyncio.Socket | None = None
        self._greeted = False
        self._connecting = asyncio.Lock()
        self._reader: asyncio.Task[None] | None = None
        self._pending: dict[int, asyncio.Future[wire.Reply]] = {}
        self._seq = itertools.count(1)
        self._down_until = 0.0
        self._warned = -1e9

    async def lookup(self, keys: Sequence[bytes], chunk_bytes: int, deadline: float) -> int | None:
        """Leading ``keys`` cached (not counted in the server's hit ratio), or ``None`` when the
        server could not answer by ``deadline`` (``loop.time()``)."""
        if not keys:
            return 0
        if time.monotonic() < self._down_until:
            self.counters["skipped_while_down"] += 1
            return None
        try:
            async with asyncio.timeout_at(deadline):
                reply = await self._lookup(keys, chunk_bytes)
        except (TimeoutError, OSError, zmq.ZMQError) as e:
            self._failed("no answer in time" if isinstance(e, TimeoutError) else repr(e))
            return None
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is None or task.cancelling():
                raise  # this request was cancelled (its client went away)
            self._failed("the connection was dropped under this lookup")  # not ours: a miss
            return None
        if isinstance(reply, wire.Count):
            return reply.n
        self._failed(f"refused: {reply.reason}" if isinstance(reply, wire.Refused) else f"answered {reply!r}")
        return None

    async def _lookup(self, keys: Sequence[bytes], chunk_bytes: int) -> wire.Reply:
        """One lookup, asked again once on a new connection when the server restarted: it
        refuses a connection it never greeted, or another lookup reconnected under this one.
        Lookups refused together drop the old connection once, not each other's new one."""
        for again in (False, True):
            await self._ready(chunk_bytes)
            sock = self._sock
            try:
                reply = await self._ask(lambda seq: wire.Lookup(seq, list(keys), False))
            except (ConnectionResetError, asyncio.CancelledError) as e:
                task = asyncio.current_task()
                if isinstance(e, asyncio.CancelledError) and task is not None and task.cancelling():
                    raise  # this request was cancelled (its client went away)
                # the socket was closed under this lookup (a send waiting on it is cancelled
                # by zmq, a reply pending fails): another lookup reconnected; ask on the new one
                if not again and self._sock is not sock:
                    continue
                raise ConnectionResetError("the connection was dropped under this lookup") from None
            if not again and isinstance(reply, wire.Refused) and reply.reason.startswith(wire.HELLO_FIRST):
                if self._sock is sock:
                    self.counters["reconnects"] += 1
                    self._drop()
                continue
            return reply
        raise AssertionError("unreachable")

    async def close(self) -> None:
        self._drop()
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None

    # -- the connection ----------------------------------------------------------------
    async def _ready(self, chunk_bytes: int) -> None:
        """Connected and greeted (``Hello`` with the engines' chunk size, as the server wants)."""
        if self._greeted:
            return
        async with self._connecting:
            if self._greeted:
                return
            if self._ctx is None:
                self._ctx = zmq.asyncio.Context()
            s = self._ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.IMMEDIATE, 1)  # a send waits for the connection instead of queueing
            s.connect(f"tcp://{self.address}")
            self._sock = s
            self._reader = asyncio.create_task(self._read(s), name="pdfabric-proxy-cache-reader")
            try:
                ok = await self._ask(lambda seq: wire.Hello(seq, wire.CACHE_WIRE_VERSION, self.name, chunk_bytes))
                if not isinstance(ok, wire.HelloOk):
                    why = ok.reason if isinstance(ok, wire.Refused) else repr(ok)
                    raise ConnectionRefusedError(f"the cache server refused our hello: {why}")
            except BaseException:
                self._drop()
                raise
            self._greeted = True

    async def _ask(self, make: Callable[[int], wire.Request]) -> wire.Reply:
        sock = self._sock
        if sock is None:
            raise ConnectionResetError("not connected to the cache server")
        seq = next(self._seq)
        fut: asyncio.Future[wire.Reply] = asyncio.get_running_loop().create_future()
        self._pending[seq] = fut
        try:
            await sock.send(wire.encode(make(seq)))
            return await fut
        finally:
            self._pending.pop(seq, None)

    async def _read(self, sock: zmq.asyncio.Socket) -> None:
        while True:
            try:
                raw = await sock.recv()
            except (zmq.ZMQError, asyncio.CancelledError):
                return  # closed (_drop)
            try:
                reply = wire.decode_reply(raw)
            except msgspec.DecodeError:
                self.counters["bad_replies"] += 1
                continue
            fut = self._pending.pop(reply.seq, None)
            if fut is None or fut.done():
                self.counters["late_replies"] += 1  # its request gave up (deadline)
            else:
                fut.set_result(reply)

    def _failed(self, why: str) -> None:
        self.counters["errors"] += 1
        self._down_until = time.monotonic() + self.retry_after_s
        self._drop()  # a new connection (and Hello) next time: the server may have restarted
        now = time.monotonic()
        if now - self._warned >= self.warn_every_s:
            self._warned = now
            log.warning("pdfabric proxy: cache lookup on %s failed (%s); requests are paired as without the "
                        "cache, and it is asked again after %.0fs", self.address, why, self.retry_after_s)

    def _drop(self) -> None:
        self._greeted = False
        if self._reader is not None:
            self._reader.cancel()
            self._reader = None
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(ConnectionResetError("the connection to the cache server was dropped"))
        self._pending.clear()
        if self._sock is not None:
            self._sock.close(0)
            self._sock = None
