"""What an engine uses to reach the tiered cache: a cache server, or a cache in this process.

``CacheClient`` is small on purpose:

- ``lookup(keys) -> int``: how many leading keys of a prefix chain are cached (any tier).
- ``read(keys) -> Pinned``: the cached values, pinned; ``views[i]`` is a read-only view of
  the value (``None`` where it is not cached any more), valid until ``pinned.close()``.
- ``reserve(keys) -> Pinned``: writable room for the values; ``views[i]`` is ``None`` where
  nothing is to be written (already cached, no room). ``close(commit=True)`` publishes.

Nothing raises for a cache that is down, slow or full: a lookup answers 0, a read answers
``None`` views, a reserve no room, each within ``timeout_s``, counted in ``counters`` and
logged (WARNING, at most once per ``warn_every_s``). A missing cache never blocks or fails
a request; it only costs the recompute.

``RemoteCacheClient`` talks to ``pdfabric cache-server`` over ZMQ and reaches the values in
the server's shared-memory arena (no socket copy); ``LocalCacheClient`` wraps a cache
object in this process (single-engine set-ups, tests).
"""

from __future__ import annotations

import itertools
import logging
import mmap
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import zmq

from pdfabric.cache import wire

__all__ = ["CacheClient", "LocalCacheClient", "Pinned", "RemoteCacheClient", "connect_cache"]

log = logging.getLogger("pdfabric.cache")


class Pinned:
    """Values pinned by ``read`` or room held by ``reserve``; close exactly once."""

    def __init__(self, views: list[memoryview | None], done: Callable[[bool], None] | None) -> None:
        self.views = views
        self._done = done

    @property
    def found(self) -> int:
        return sum(v is not None for v in self.views)

    def close(self, commit: bool = True) -> None:
        done, self._done = self._done, None
        if done is not None:
            done(commit)

    def __enter__(self) -> Pinned:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        self.close(commit=exc_type is None)


class CacheClient(Protocol):
    chunk_bytes: int
    counters: Counter[str]

    def lookup(self, keys: Sequence[bytes], *, count: bool = True) -> int: ...

    def read(self, keys: Sequence[bytes]) -> Pinned: ...

    def reserve(self, keys: Sequence[bytes]) -> Pinned: ...

    def close(self) -> None: ...


class _Warner:
    def __init__(self, every_s: float) -> None:
        self.every_s = every_s
        self._last = -1e9

    def __call__(self, msg: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self._last >= self.every_s:
            self._last = now
            log.warning(msg, *args)


class RemoteCacheClient:
    """A client of ``pdfabric cache-server`` at ``address`` (``host:port``). Thread-safe.

    ``fingerprint`` (with ``chunk_tokens``): the keying of the keys this client computes,
    told to the server in its Hello so that the proxy can compute the same keys (``salted``:
    keys with a tenant salt, which the server does not publish)."""

    def __init__(self, address: str, chunk_bytes: int, *, name: str = "engine", timeout_s: float = 0.5,
                 retry_after_s: float = 2.0, warn_every_s: float = 30.0, chunk_tokens: int = 0,
                 fingerprint: str = "", salted: bool = False) -> None:
        self.address = address
        self.chunk_bytes = chunk_bytes
        self.chunk_tokens = chunk_tokens
        self.fingerprint, self.salted = fingerprint, salted
        self.name = name
        self.timeout_s = timeout_s
        self.retry_after_s = retry_after_s  # after a failure, answer "not cached" at once this long
        self.counters: Counter[str] = Counter()
        self._warn = _Warner(warn_every_s)
        self._lock = threading.Lock()
        self._ctx = zmq.Context.instance()
        self._sock: zmq.Socket[bytes] | None = None
        self._seq = itertools.count(1)
        self._map: mmap.mmap | None = None
        self._arena: memoryview | None = None
        self._down_until = 0.0
        self._gen = 0  # bumped on every new connection: a lease belongs to the one it came on

    # -- connection ----------------------------------------------------------------------
    def _socket(self) -> zmq.Socket[bytes]:
        if self._sock is None:
            s = self._ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.IMMEDIATE, 1)  # queue nothing for a server we are not connected to
            s.setsockopt(zmq.SNDTIMEO, max(1, int(self.timeout_s * 1000)))  # ... and wait at most this
            s.connect(f"tcp://{self.address}")
            self._sock = s
            try:
                ok = self._ask(wire.Hello(next(self._seq), wire.CACHE_WIRE_VERSION, self.name, self.chunk_bytes,
                                          self.chunk_tokens, self.fingerprint, self.salted))
            except Exception:
                self._drop()
                raise
            if isinstance(ok, wire.Refused):
                self._drop()
                raise ConnectionRefusedError(f"cache server {self.address} refused us: {ok.reason}")
            assert isinstance(ok, wire.HelloOk)
            self._attach(ok)
        return self._sock

    def _attach(self, ok: wire.HelloOk) -> None:
        self._gen += 1
        fd = os.open(ok.shm_path, os.O_RDWR)
        try:
            self._map = mmap.mmap(fd, ok.arena_bytes)
        finally:
            os.close(fd)
        self._arena = memoryview(self._map)

    def _drop(self) -> None:
        if self._sock is not None:
            self._sock.close(0)
            self._sock = None
        if self._arena is not None:
            try:
                self._arena.release()
            except BufferError:  # a caller still holds a view: the map goes when it does
                pass
            self._arena = None
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:
                pass
            self._map = None

    def _ask(self, msg: wire.Request) -> wire.Reply:
        """Send and wait for the answer with the same seq (caller holds the lock)."""
        assert self._sock is not None
        deadline = time.monotonic() + self.timeout_s
        try:
            self._sock.send(wire.encode(msg))
        except zmq.Again:
            raise ConnectionError(f"not connected to the cache server {self.address}") from None
        while (left := deadline - time.monotonic()) > 0:
            if not self._sock.poll(int(left * 1000) + 1):
                break
            reply = wire.decode_reply(self._sock.recv())
            if reply.seq == msg.seq:
                return reply
            self.counters["late_replies"] += 1
        raise TimeoutError(f"no answer from the cache server {self.address} within {self.timeout_s}s")

    def _call(self, make: Callable[[int], wire.Request], what: str, gen: int | None = None) -> wire.Reply | None:
        """One exchange; ``None`` when the server is down, slow or refuses (counted, logged).
        ``gen``: the connection a lease came on; on another one (the server restarted since)
        its end is not sent (lease numbers start anew there: it would end someone else's)."""
        with self._lock:
            if gen is not None and gen != self._gen:
                self.counters["stale_leases"] += 1
                return None
            if time.monotonic() < self._down_until:
                self.counters["skipped_while_down"] += 1
                return None
            try:
                self._socket()
                reply = self._ask(make(next(self._seq)))
                if gen is None and isinstance(reply, wire.Refused) and reply.reason.startswith(wire.HELLO_FIRST):
                    # a new server on this port (it restarted): greet it, map its arena, ask again
                    self.counters["reconnects"] += 1
                    self._drop()
                    self._socket()
                    reply = self._ask(make(next(self._seq)))
            except Exception as e:
                self.counters["errors"] += 1
                self._down_until = time.monotonic() + self.retry_after_s
                self._drop()  # a new connection (and Hello) next time: the server may have restarted
                self._warn("pdfabric cache: %s on the cache server %s failed: %s; treated as a miss "
                           "(retrying after %.0fs)", what, self.address, e, self.retry_after_s)
                return None
        if isinstance(reply, wire.Refused):
            self.counters["refused"] += 1
            self._warn("pdfabric cache: the cache server %s refused %s: %s", self.address, what, reply.reason)
            return None
        return reply

    # -- the interface -------------------------------------------------------------------
    def lookup(self, keys: Sequence[bytes], *, count: bool = True) -> int:
        """Leading keys cached; ``count=False``: not a prompt lookup (kept out of the hit ratio)."""
        if not keys:
            return 0
        reply = self._call(lambda seq: wire.Lookup(seq, list(keys), count), "lookup")
        return reply.n if isinstance(reply, wire.Count) else 0

    def read(self, keys: Sequence[bytes]) -> Pinned:
        return self._lease(keys, wire.Read, "read")

    def reserve(self, keys: Sequence[bytes]) -> Pinned:
        return self._lease(keys, wire.Reserve, "reserve")

    def _lease(self, keys: Sequence[bytes], kind: type[wire.Read | wire.Reserve], what: str) -> Pinned:
        none: list[memoryview | None] = [None] * len(keys)
        if not keys:
            return Pinned(none, None)
        got: list[tuple[memoryview | None, int]] = []

        def ask(seq: int) -> wire.Request:
            got.append((self._arena, self._gen))  # the connection the answer comes on (under the lock)
            return kind(seq, list(keys))

        reply = self._call(ask, what)
        if not isinstance(reply, wire.Leased) or reply.lease == 0:
            return Pinned(none, None)
        (arena, gen), n = got[-1], self.chunk_bytes
        assert arena is not None
        views: list[memoryview | None] = []
        for off in reply.offsets:
            if off < 0:
                views.append(None)
            else:
                v = arena[off: off + n]
                views.append(v.toreadonly() if kind is wire.Read else v)
        lease, read = reply.lease, kind is wire.Read

        def done(commit: bool) -> None:
            msg: Callable[[int], wire.Request] = (
                (lambda seq: wire.Release(seq, lease)) if read else (lambda seq: wire.Commit(seq, lease, commit)))
            self._call(msg, "release" if read else "commit", gen)

        return Pinned(views, done)

    def stats(self) -> dict[str, object]:
        reply = self._call(lambda seq: wire.Stats(seq), "stats")
        return reply.stats if isinstance(reply, wire.StatsReply) else {}

    def close(self) -> None:
        with self._lock:
            self._drop()


class LocalCacheClient:
    """A cache object in this process behind the client interface (no server).

    ``cache`` has ``lookup(keys) -> int``, ``prepare_get/complete_get`` and
    ``prepare_put/complete_put`` with L1 views (``pdfabric.cache.tiered.TieredCache``)."""

    def __init__(self, cache: Any, chunk_bytes: int, chunk_tokens: int = 0) -> None:
        self.cache = cache
        self.chunk_bytes = chunk_bytes
        self.chunk_tokens = chunk_tokens
        self.counters: Counter[str] = Counter()

    def lookup(self, keys: Sequence[bytes], *, count: bool = True) -> int:
        if not keys:
            return 0
        n = int(self.cache.lookup(list(keys)))
        if count and self.chunk_tokens:
            self.cache.record_lookup(len(keys) * self.chunk_tokens, n * self.chunk_tokens)
        return n

    def read(self, keys: Sequence[bytes]) -> Pinned:
        lease = self.cache.prepare_get(list(keys))
        views = [None if v is None else v.toreadonly() for v in lease.views]
        return Pinned(views, lambda _commit: self.cache.complete_get(lease))

    def reserve(self, keys: Sequence[bytes]) -> Pinned:
        lease = self.cache.prepare_put(list(keys), self.chunk_bytes)
        return Pinned(list(lease.buffers), lambda commit: self.cache.complete_put(lease, commit=commit))

    def close(self) -> None:
        pass


def connect_cache(address: str | None, chunk_bytes: int, **kw: Any) -> CacheClient | None:
    """A remote client for ``host:port``, or ``None`` when no address is configured."""
    return RemoteCacheClient(address, chunk_bytes, **kw) if address else None
