"""``pdfabric cache-server``: one per host, owns L1 (shared memory) and L2 (disk) and reaches
L3 (Redis, S3) for every engine on the host.

- **Data in shared memory.** L1's arena is a file under ``/dev/shm`` that clients map. A
  ``Read`` pins the values (promoting lower-tier hits into L1 first) and answers their
  offsets; a ``Reserve`` hands out free L1 slots to fill and ``Commit``. No value crosses
  the socket.
- **Engines come and go.** A client that dies holding pins loses them after
  ``lease_ttl_s``; nothing it cached is lost. A restarted server finds L2 (and L3) as they
  were; L1 starts empty.
- **One chunk size.** The first client fixes the chunk size (it follows from the model and
  the chunk tokens); a client with another is refused with the reason.
- **Keyings.** An engine's scheduler says in its Hello how it computes chunk keys (its
  fingerprint text and chunk tokens); ``/health`` lists the pairs seen, most recent first,
  so the proxy can compute the same keys and ask before it sends a prefill leg. Salted
  keys (a tenant salt) are never listed: only their engines can compute them.
- **HTTP** on ``http_port``: ``/health`` (``status``, ``chunk_bytes``, ``keyings``),
  ``/metrics`` (Prometheus), ``GET /admin/stats``, ``POST /admin/clear``,
  ``POST /admin/evict?prefix=HEX`` (keys starting with HEX).

Threads: the ZMQ loop (all requests, in order), the HTTP server, the tiers' write-behind.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import mmap
import os
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import numpy as np
import zmq

from pdfabric.cache import wire
from pdfabric.config.models import CacheConfig

__all__ = ["SHM_DIR", "CacheService", "remove_stale_arenas"]

log = logging.getLogger("pdfabric.cache")

SHM_DIR = Path("/dev/shm")
FORGET_IDLE_S = 3600.0  # a greeted connection silent this long is forgotten (it greets again)
_MAX_KEYINGS = 8  # one deployment has one; a few models sharing a server stay listed
_ARENA = re.compile(r"^pdfabric-cache-(\d+)-[0-9a-f]+$")


def remove_stale_arenas(directory: Path = SHM_DIR) -> list[str]:
    """Unlink arena files of cache servers that died without cleaning up (by pid)."""
    removed = []
    for p in directory.glob("pdfabric-cache-*"):
        m = _ARENA.match(p.name)
        if m is None:
            continue
        try:
            os.kill(int(m.group(1)), 0)
        except ProcessLookupError:
            p.unlink(missing_ok=True)
            removed.append(p.name)
        except PermissionError:  # alive, someone else's
            pass
    return removed


@dataclass
class _Lease:
    kind: str  # "read" / "write"
    handle: Any
    client: bytes
    at: float


@dataclass(eq=False)
class _Conn:
    """A connection this server greeted (by its ZMQ identity)."""

    client: str  # the name its Hello gave
    chunk_tokens: int
    seen: float  # time.monotonic() of its last request


@dataclass
class _Arena:
    path: Path
    size: int
    map: mmap.mmap
    array: np.ndarray = field(init=False)
    base: int = field(init=False)

    def __post_init__(self) -> None:
        self.array = np.frombuffer(self.map, dtype=np.uint8)
        self.base = int(self.array.ctypes.data)

    def offset(self, view: memoryview) -> int:
        return int(np.frombuffer(view, dtype=np.uint8).ctypes.data) - self.base


class CacheService:
    """The cache server's state and loops; ``start()`` binds, ``stop()`` ends everything."""

    def __init__(self, config: CacheConfig, *, host: str = "127.0.0.1", port: int = 0, http_port: int | None = 0,
                 base_dir: str | None = None, lease_ttl_s: float = 60.0, shm_dir: Path = SHM_DIR,
                 forget_idle_s: float = FORGET_IDLE_S) -> None:
        self.config = config
        self.host, self.port, self.http_port = host, port, http_port
        self.base_dir = base_dir
        self.lease_ttl_s = lease_ttl_s
        self.forget_idle_s = forget_idle_s
        self.shm_dir = shm_dir
        self.cache: Any = None  # TieredCache, built when the first client fixes the chunk size
        self.chunk_bytes: int | None = None
        self.arena: _Arena | None = None
        self.counters: dict[str, int] = {"requests": 0, "hellos": 0, "refused": 0, "expired_leases": 0,
                                         "bad_messages": 0, "forgotten_connections": 0}
        self._leases: dict[int, _Lease] = {}
        # greeted connections; one silent for forget_idle_s (and holding no lease) is
        # forgotten: its next request is refused as not greeted, and its client says Hello again
        self._conns: dict[bytes, _Conn] = {}
        self._disk_locks: dict[int, int] = {}  # tier index -> fd holding its directory's lock until built
        self._names: tuple[str, ...] = ()  # their clients' names; replaced whole (read by HTTP)
        # (fingerprint, chunk_tokens) of unsalted clients, most recent first; replaced whole,
        # so the HTTP thread reads it without the lock
        self._keyings: tuple[tuple[str, int], ...] = ()
        self._next_lease = int.from_bytes(os.urandom(6), "big") + 1  # not 1 again after a restart
        self._lock = threading.Lock()  # the ZMQ thread vs the HTTP admin calls
        self._ctx = zmq.Context()
        self._sock: zmq.Socket[bytes] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._http: ThreadingHTTPServer | None = None
        self._http_thread: threading.Thread | None = None
        self.started = time.time()

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        """Check the tiers' directories, bind both ports, start the loops. ``ConfigError``
        for a tier that cannot work (the cache is built at the first hello, too late to
        say so), ``OSError`` naming the port that cannot be bound."""
        self._check_disk_tiers()
        remove_stale_arenas(self.shm_dir)
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
        try:
            if self.port == 0:
                self.port = self._sock.bind_to_random_port(f"tcp://{self.host}")
            else:
                self._sock.bind(f"tcp://{self.host}:{self.port}")
        except zmq.ZMQError as e:
            raise OSError(e.errno, f"cannot listen on {self.host}:{self.port} (engines): {e.strerror}") from None
        self._thread = threading.Thread(target=self._loop, name="pdfabric-cache-server", daemon=True)
        self._thread.start()
        if self.http_port is not None:
            try:
                self._http = ThreadingHTTPServer((self.host, self.http_port), _handler(self))
            except OSError as e:
                raise OSError(e.errno, f"cannot listen on {self.host}:{self.http_port} (HTTP): {e.strerror}") from None
            self._http.daemon_threads = True
            self.http_port = int(self._http.server_address[1])
            self._http_thread = threading.Thread(target=self._http.serve_forever, kwargs={"poll_interval": 0.2},
                                                 name="pdfabric-cache-http", daemon=True)
            self._http_thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
        if self._sock is not None:
            self._sock.close(0)
        self._ctx.term()
        with self._lock:
            for fd in self._disk_locks.values():
                os.close(fd)
            self._disk_locks.clear()
            for lease in list(self._leases.values()):
                self._end(lease, commit=False)
            self._leases.clear()
            if self.cache is not None:
                self.cache.close()
            self._release_arena()

    def _release_arena(self) -> None:
        if self.arena is not None:
            self.arena.array = np.empty(0, dtype=np.uint8)
            try:
                self.arena.map.close()
            except BufferError:
                pass
            self.arena.path.unlink(missing_ok=True)
            self.arena = None

    def _tier_path(self, p: str) -> Path:
        path = Path(p).expanduser()
        return path if path.is_absolute() else Path(self.base_dir or os.getcwd()) / path

    def _check_disk_tiers(self) -> None:
        """Each disk tier's directory exists (made now) and no other process owns it; its
        lock is held from now on (handed to the tier when the first hello builds it)."""
        import fcntl

        from pdfabric.errors import ConfigError

        for i, spec in enumerate(self.config.tiers):
            if spec.kind != "disk" or i in self._disk_locks:
                continue
            where = f"cache.tiers[{i}].path"
            try:
                root = self._tier_path(spec.path)
            except RuntimeError as e:  # ~user that does not exist
                raise ConfigError(f"cannot use {spec.path}: {e}", path=where) from None
            try:
                root.mkdir(parents=True, exist_ok=True)
                fd = os.open(root / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as e:
                raise ConfigError(f"the disk tier cannot use {root}: {e.strerror or e}", path=where) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise ConfigError(f"{root} is in use by another cache (it holds {root}/.lock); give each "
                                      "cache server its own directory", path=where) from None
                raise ConfigError(f"cannot lock {root}/.lock: {e.strerror or e}", path=where) from None
            self._disk_locks[i] = fd

    # -- the cache, once the chunk size is known ------------------------------------------
    def _build(self, chunk_bytes: int) -> None:
        from pdfabric.cache.memory_tier import MemoryTier
        from pdfabric.cache.tiered import TieredCache, build_tier
        from pdfabric.config.secrets import resolve_secret

        tiers: list[Any] = []
        try:
            for i, spec in enumerate(self.config.tiers):
                if spec.kind == "memory":
                    size = MemoryTier.arena_bytes_for(spec.size, chunk_bytes)
                    self.arena = self._map_arena(size)
                    tiers.append(MemoryTier(spec.size, chunk_bytes, name="memory", arena=self.arena.array))
                    continue
                if i in self._disk_locks:  # the disk tier takes its directory's lock itself now
                    os.close(self._disk_locks.pop(i))
                tiers.append(build_tier(
                    spec, chunk_bytes, f"cache.tiers[{i}]", self._tier_path,
                    lambda ref, where: resolve_secret(ref, path=where, base_dir=str(self.base_dir or os.getcwd()))))
            if self.arena is None:
                raise ValueError("the cache server needs a memory tier (L1): engines read and write through it")
            self.cache = TieredCache(tiers)
        except BaseException:
            # a later tier failed (a missing package, /dev/shm full): give back what was built,
            # so that the next hello builds again instead of meeting our own disk lock
            for t in tiers:
                with contextlib.suppress(Exception):
                    t.close()
            self._release_arena()
            try:
                self._check_disk_tiers()
            except Exception as e:  # the build's own error is the one to report
                log.warning("pdfabric cache-server: cannot take the disk tiers' locks again: %s", e)
            raise
        self.chunk_bytes = chunk_bytes
        log.info("pdfabric cache-server: chunks of %d bytes; L1 arena %s (%d bytes)", chunk_bytes,
                 self.arena.path, self.arena.size)

    def _map_arena(self, size: int) -> _Arena:
        path = self.shm_dir / f"pdfabric-cache-{os.getpid()}-{os.urandom(4).hex()}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, size)
            m = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        return _Arena(path, size, m)

    # -- the ZMQ loop ----------------------------------------------------------------------
    def _loop(self) -> None:
        assert self._sock is not None
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        last_sweep = time.monotonic()
        while not self._stop.is_set():
            if poller.poll(100):
                while True:
                    try:
                        ident, raw = self._sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    except ValueError:  # not two frames
                        self.counters["bad_messages"] += 1
                        continue
                    reply = self._handle(ident, raw)
                    if reply is not None:
                        self._sock.send_multipart([ident, wire.encode(reply)])
            if time.monotonic() - last_sweep > 1.0:
                last_sweep = time.monotonic()
                self._sweep()

    def _handle(self, ident: bytes, raw: bytes) -> wire.Reply | None:
        try:
            msg = wire.decode_request(raw)
        except Exception:
            self.counters["bad_messages"] += 1
            return None
        self.counters["requests"] += 1
        with self._lock:
            try:
                return self._answer(ident, msg)
            except Exception as e:  # a bug or a failing tier: the client treats it as a miss
                log.exception("pdfabric cache-server: %s failed", type(msg).__name__)
                return wire.Refused(msg.seq, f"{type(msg).__name__} failed on the server: {e}")

    def _answer(self, ident: bytes, msg: wire.Request) -> wire.Reply:
        seq = msg.seq
        if isinstance(msg, wire.Hello):
            self.counters["hellos"] += 1
            if msg.version != wire.CACHE_WIRE_VERSION:
                self.counters["refused"] += 1
                return wire.Refused(seq, f"wire version {msg.version}; this server speaks {wire.CACHE_WIRE_VERSION}")
            if msg.chunk_bytes <= 0:
                return wire.Refused(seq, f"chunk_bytes must be positive, got {msg.chunk_bytes}")
            if self.cache is None:
                self._build(msg.chunk_bytes)
            if msg.chunk_bytes != self.chunk_bytes:
                self.counters["refused"] += 1
                return wire.Refused(seq, f"this server holds chunks of {self.chunk_bytes} bytes, the client's are "
                                         f"{msg.chunk_bytes}: another model, dtype or chunk_tokens needs its own "
                                         "cache server")
            self._conns[ident] = _Conn(msg.client, msg.chunk_tokens, time.monotonic())
            self._names = tuple(sorted({c.client for c in self._conns.values()}))
            self._remember_keying(msg)
            assert self.arena is not None
            return wire.HelloOk(seq, str(self.arena.path), self.arena.size, msg.chunk_bytes)
        conn = self._conns.get(ident)
        if self.cache is None or self.arena is None or conn is None:
            # a connection this server never greeted: its client may hold the arena of a
            # server that ran here before (written into, it would reach nobody)
            return wire.Refused(seq, f"{wire.HELLO_FIRST}: this server has not greeted this connection "
                                     "(it may have restarted)")
        conn.seen = time.monotonic()
        if isinstance(msg, wire.Lookup):
            n = self.cache.lookup(msg.keys)
            per = conn.chunk_tokens
            if msg.count and per:
                self.cache.record_lookup(len(msg.keys) * per, n * per)
            return wire.Count(seq, n)
        if isinstance(msg, wire.Read):
            lease = self.cache.prepare_get(msg.keys)
            offsets = [-1 if v is None else self.arena.offset(v) for v in lease.views]
            return wire.Leased(seq, self._keep("read", lease, ident), offsets)
        if isinstance(msg, wire.Reserve):
            lease = self.cache.prepare_put(msg.keys, self.chunk_bytes)
            offsets = [-1 if b is None else self.arena.offset(b) for b in lease.buffers]
            return wire.Leased(seq, self._keep("write", lease, ident), offsets)
        if isinstance(msg, (wire.Release, wire.Commit)):
            held = self._leases.get(msg.lease)
            if held is None or held.client != ident:  # only the connection it was given to ends it
                return wire.Refused(seq, f"lease {msg.lease} is not open (expired after {self.lease_ttl_s}s?)")
            del self._leases[msg.lease]
            n = self._end(held, commit=isinstance(msg, wire.Commit) and msg.ok)
            return wire.Done(seq, n)
        if isinstance(msg, wire.Stats):
            return wire.StatsReply(seq, self.stats())
        return wire.Refused(seq, f"unexpected {type(msg).__name__}")

    def _remember_keying(self, msg: wire.Hello) -> None:
        if not msg.fingerprint or msg.chunk_tokens <= 0 or msg.salted:
            return
        k = (msg.fingerprint, msg.chunk_tokens)
        self._keyings = (k, *(x for x in self._keyings if x != k))[:_MAX_KEYINGS]

    @property
    def keyings(self) -> list[dict[str, Any]]:
        """How clients compute their chunk keys (unsalted only), most recent first."""
        return [{"fingerprint": fp, "chunk_tokens": ct} for fp, ct in self._keyings]

    def _keep(self, kind: str, handle: Any, ident: bytes) -> int:
        n = self._next_lease
        self._next_lease += 1
        self._leases[n] = _Lease(kind, handle, ident, time.monotonic())
        return n

    def _end(self, lease: _Lease, *, commit: bool) -> int:
        if lease.kind == "read":
            self.cache.complete_get(lease.handle)
            return 0
        outcomes = self.cache.complete_put(lease.handle, commit=commit)
        return sum(1 for o in outcomes if getattr(o, "value", o) == "stored")

    def _sweep(self) -> None:
        """Leases of clients that died (or forgot) end after ``lease_ttl_s``: pins released,
        reserved room given back."""
        now = time.monotonic()
        with self._lock:
            for n, lease in list(self._leases.items()):
                if now - lease.at > self.lease_ttl_s:
                    del self._leases[n]
                    self.counters["expired_leases"] += 1
                    log.warning("pdfabric cache-server: a %s lease of a client expired after %.0fs; released",
                                lease.kind, self.lease_ttl_s)
                    self._end(lease, commit=False)
            holding = {lease.client for lease in self._leases.values()}
            for ident, conn in list(self._conns.items()):
                if now - conn.seen > self.forget_idle_s and ident not in holding:
                    del self._conns[ident]
                    self.counters["forgotten_connections"] += 1
                    self._names = tuple(sorted({c.client for c in self._conns.values()}))

    # -- admin -------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {"server": dict(self.counters), "open_leases": len(self._leases),
                               "clients": self.client_names(), "connections": len(self._conns),
                               "chunk_bytes": self.chunk_bytes,
                               "keyings": self.keyings,
                               "uptime_s": round(time.time() - self.started, 1)}
        if self.cache is not None:
            out["cache"] = _plain(self.cache.stats())
        return out

    def client_names(self) -> list[str]:
        """The names of the clients whose connections this server greeted and has not forgotten."""
        return list(self._names)

    def clear(self) -> int:
        with self._lock:
            return int(self.cache.clear()) if self.cache is not None else 0

    def evict(self, prefix: str) -> int:
        with self._lock:
            return int(self.cache.evict_prefix(bytes.fromhex(prefix))) if self.cache is not None else 0

    def metrics_text(self) -> str:
        from pdfabric.cache.metrics import render_metrics

        lines = [
            "# TYPE pdfabric_cache_server_requests_total counter",
            f"pdfabric_cache_server_requests_total {self.counters['requests']}",
            "# TYPE pdfabric_cache_server_open_leases gauge",
            f"pdfabric_cache_server_open_leases {len(self._leases)}",
            "# TYPE pdfabric_cache_server_expired_leases_total counter",
            f"pdfabric_cache_server_expired_leases_total {self.counters['expired_leases']}",
            "# TYPE pdfabric_cache_server_clients gauge",
            f"pdfabric_cache_server_clients {len(self.client_names())}",
        ]
        text = "\n".join(lines) + "\n"
        if self.cache is not None:
            text += render_metrics(self.cache.stats())
        return text


def _plain(obj: Any) -> Any:
    """JSON-ready form of stats dataclasses."""
    if hasattr(obj, "as_dict"):
        return _plain(obj.as_dict())
    if hasattr(obj, "__dataclass_fields__"):
        return {k: _plain(getattr(obj, k)) for k in obj.__dataclass_fields__}
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


_HTTP_PATHS = {"GET": ("/health", "/metrics", "/admin/stats"), "POST": ("/admin/clear", "/admin/evict")}


class _Handler(BaseHTTPRequestHandler):
    """The cache server's HTTP side: health, metrics, stats and the admin actions."""

    protocol_version = "HTTP/1.1"
    svc: CacheService  # set on the subclass ``_handler`` makes

    def log_message(self, *args: Any) -> None:  # no access log on stderr
        pass

    def _send(self, status: int, body: Any, ctype: str = "application/json",
              headers: dict[str, str] | None = None) -> None:
        data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        svc = self.svc
        path = urlsplit(self.path).path
        if path == "/health":
            self._send(200, {"status": "ok", "chunk_bytes": svc.chunk_bytes, "keyings": svc.keyings})
        elif path == "/metrics":
            self._send(200, svc.metrics_text(), "text/plain; version=0.0.4")
        elif path == "/admin/stats":
            with svc._lock:
                self._send(200, svc.stats())
        else:
            self._unknown("GET", path)

    def _unknown(self, method: str, path: str) -> None:
        """404 for a path nobody serves, 405 (with Allow) for one served with another method."""
        allowed = [m for m, paths in _HTTP_PATHS.items() if path in paths]
        if not allowed:
            self._send(404, {"error": {"message": f"no such endpoint: {method} {path}", "code": 404}})
            return
        self._send(405, {"error": {"message": f"{path} takes {' or '.join(allowed)}, not {method}", "code": 405}},
                   headers={"Allow": ", ".join(allowed)})

    def _body(self) -> bool:
        """Read (and drop) the request body; False, with a 400 sent, when its length is bad."""
        text = self.headers.get("Content-Length") or "0"
        if not text.isdigit() or int(text) > 1 << 20:
            self.close_connection = True
            self._send(400, {"error": {"message": f"bad Content-Length {text!r}", "code": 400}})
            return False
        if int(text):
            self.rfile.read(int(text))
        return True

    def _other(self) -> None:
        if self._body():
            self._unknown(self.command, urlsplit(self.path).path)

    do_PUT = do_DELETE = do_PATCH = _other

    def do_POST(self) -> None:
        url = urlsplit(self.path)
        if not self._body():
            return
        if url.path == "/admin/clear":
            self._send(200, {"removed": self.svc.clear()})
        elif url.path == "/admin/evict":
            prefix = (parse_qs(url.query).get("prefix") or [""])[0]
            if not re.fullmatch(r"(?:[0-9a-fA-F]{2})+", prefix):
                self._send(400, {"error": {"message": "prefix: expected an even number of hex digits "
                                                      f"(a key prefix), got {prefix!r}", "code": 400}})
                return
            self._send(200, {"removed": self.svc.evict(prefix)})
        else:
            self._unknown("POST", url.path)


def _handler(svc: CacheService) -> type[BaseHTTPRequestHandler]:
    """A handler class bound to ``svc`` (``ThreadingHTTPServer`` takes a class, not an instance)."""
    return type("Handler", (_Handler,), {"svc": svc})
