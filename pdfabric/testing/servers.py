"""Real backing stores for cache tests and benchmarks: ``redis-server``, moto's S3 server
and ``pdfabric cache-server``, each a child process on a free 127.0.0.1 port, stopped by its
pid.

``RedisServer`` can also be killed (SIGKILL), frozen (SIGSTOP) and resumed, and restarted
on the same port, for the failure tests.
"""

from __future__ import annotations

import http.client
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import IO, Self

__all__ = ["CacheServerProcess", "MotoServer", "RedisServer", "ServerProcess", "free_port",
           "redis_server_available"]


def free_port() -> int:
    """A port that was free on 127.0.0.1 a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def redis_server_available() -> bool:
    return shutil.which("redis-server") is not None


class ServerProcess:
    """One child process answering on ``127.0.0.1:port``; ``ready()`` says when it does."""

    name = "server"

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def argv(self) -> list[str]:
        raise NotImplementedError

    def ready(self) -> bool:
        raise NotImplementedError

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, n: int = 2000) -> str:
        if self._log is None:
            return ""
        self._log.seek(0)
        return self._log.read().decode("utf-8", "replace")[-n:]

    def start(self, timeout: float = 20.0) -> ServerProcess:
        if self.alive:
            return self
        self._close_log()
        self._log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            self.argv(), stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            if self.ready():
                return self
            time.sleep(0.05)
        tail = self.log_tail()
        self.stop()
        raise RuntimeError(f"{self.name} on 127.0.0.1:{self.port} did not start within {timeout:g}s:\n{tail}")

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.alive:
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait(10)

    def pause(self) -> None:
        """SIGSTOP: the port still accepts connections, nothing answers."""
        if self.alive:
            assert self.proc is not None
            os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self.alive:
            assert self.proc is not None
            os.kill(self.proc.pid, signal.SIGCONT)

    def stop(self, grace: float = 5.0) -> None:
        p = self.proc
        if p is not None and p.poll() is None:
            self.resume()
            p.terminate()
            try:
                p.wait(grace)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
        self._close_log()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _probe(port: int, payload: bytes, check: Callable[[bytes], bool]) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(payload)
            return check(s.recv(64))
    except OSError:
        return False


class RedisServer(ServerProcess):
    """``redis-server`` without persistence; ``url`` is ``redis://127.0.0.1:PORT/0``."""

    name = "redis-server"

    def __init__(
        self,
        port: int | None = None,
        *,
        password: str | None = None,
        maxmemory: str | None = None,
        maxmemory_policy: str = "allkeys-lru",
    ) -> None:
        super().__init__(port)
        self.password = password
        self.maxmemory = maxmemory
        self.maxmemory_policy = maxmemory_policy

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def argv(self) -> list[str]:
        argv = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--protected-mode", "no"]  # fmt: skip
        if self.password:
            argv += ["--requirepass", self.password]
        if self.maxmemory:
            argv += ["--maxmemory", self.maxmemory, "--maxmemory-policy", self.maxmemory_policy]
        return argv

    def ready(self) -> bool:
        return _probe(self.port, b"PING\r\n", lambda r: r.startswith((b"+PONG", b"-NOAUTH")))


class MotoServer(ServerProcess):
    """moto's standalone S3-compatible server; ``endpoint`` is ``http://127.0.0.1:PORT``."""

    name = "moto.server"

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]

    def ready(self) -> bool:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=0.5)
        try:
            conn.request("GET", "/moto-api/")
            conn.getresponse().read()
            return True
        except OSError:
            return False
        finally:
            conn.close()


class CacheServerProcess(ServerProcess):
    """``pdfabric cache-server`` with an L1 of ``memory`` only; ``address`` is its engine port
    (``127.0.0.1:PORT``), ``http_port`` serves ``/health``, ``/metrics`` and the admin API."""

    name = "pdfabric cache-server"

    def __init__(self, port: int | None = None, *, http_port: int | None = None, memory: str = "64MiB") -> None:
        super().__init__(port)
        self.http_port = http_port or free_port()
        self.memory = memory

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "pdfabric.cli", "cache-server", "--port", str(self.port),
                "--http-port", str(self.http_port), "--memory", self.memory]

    def ready(self) -> bool:
        conn = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=0.5)
        try:
            conn.request("GET", "/health")
            return conn.getresponse().status == 200
        except OSError:
            return False
        finally:
            conn.close()
