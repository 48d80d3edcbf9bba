"""``pdfabric cache-server`` as engines use it: a real server process, clients over ZMQ reading
and writing its shared-memory arena, a client killed holding pins, a server restarted (L2
kept), a server down (misses within a bounded time), the HTTP side."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from pdfabric.cache.client import RemoteCacheClient
from pdfabric.cache.server import SHM_DIR
from pdfabric.testing.servers import free_port

pytestmark = pytest.mark.integration

CHUNK = 256 * 1024


class Server:
    def __init__(self, tmp: Path, *extra: str) -> None:
        self.port, self.http = free_port(), free_port()
        self.argv = [sys.executable, "-m", "pdfabric.cli", "cache-server", "--port", str(self.port),
                     "--http-port", str(self.http), "--memory", "8MiB", "--disk", str(tmp / "l2"),
                     "--disk-size", "64MiB", *extra]
        self.log = tmp / f"cache-server-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> Server:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while "pdfabric cache-server on" not in self.log.read_text():
            assert self.proc.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.05)
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http}{path}", timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def post(self, path: str) -> tuple[int, str]:
        req = urllib.request.Request(f"http://127.0.0.1:{self.http}{path}", data=b"", method="POST")
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def metrics(self) -> dict[str, float]:
        out = {}
        for line in self.get("/metrics")[1].splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    s = Server(tmp_path, "--lease-ttl", "1").start()
    try:
        yield s
    finally:
        s.stop()


def disk_entries(s: Server) -> int:
    tiers = json.loads(s.get("/admin/stats")[1])["cache"]["tiers"]
    return int(next(t["entries"] for t in tiers if t["kind"] == "disk"))


def key(i: int) -> bytes:
    return bytes([i]) * 16


def pattern(i: int) -> bytes:
    return bytes((i * 7 + j) % 251 for j in range(256)) * (CHUNK // 256)


def fill(client: RemoteCacheClient, ids: list[int]) -> None:
    with client.reserve([key(i) for i in ids]) as room:
        assert room.found == len(ids)
        for i, view in zip(ids, room.views):
            assert view is not None
            view[:] = pattern(i)


def test_values_written_by_one_engine_are_read_by_another(server: Server) -> None:
    a = RemoteCacheClient(server.address, CHUNK, name="engine-a")
    b = RemoteCacheClient(server.address, CHUNK, name="engine-b")
    try:
        fill(a, [1, 2, 3])
        assert b.lookup([key(1), key(2), key(3), key(4)]) == 3
        assert b.lookup([key(9), key(1)]) == 0  # a prefix chain stops at the first miss
        with b.read([key(2), key(4), key(3)]) as pinned:
            assert [v is not None for v in pinned.views] == [True, False, True]
            assert bytes(pinned.views[0]) == pattern(2) and bytes(pinned.views[2]) == pattern(3)
            assert pinned.views[0].readonly
        with a.reserve([key(1), key(5)]) as room:  # 1 is cached already: no room handed out
            assert room.views[0] is None and room.views[1] is not None
            room.views[1][:] = pattern(5)
        assert b.lookup([key(1), key(2), key(3)]) == 3 and b.lookup([key(5)]) == 1
        stats = json.loads(server.get("/admin/stats")[1])
        assert stats["open_leases"] == 0 and {"engine-a", "engine-b"} <= set(stats["clients"])
    finally:
        a.close()
        b.close()


def test_an_aborted_write_publishes_nothing(server: Server) -> None:
    c = RemoteCacheClient(server.address, CHUNK)
    try:
        with pytest.raises(RuntimeError), c.reserve([key(7)]) as room:
            assert room.views[0] is not None
            raise RuntimeError("the engine failed while copying")
        assert c.lookup([key(7)]) == 0
    finally:
        c.close()


def test_a_client_with_another_chunk_size_is_refused_and_sees_only_misses(server: Server,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    a = RemoteCacheClient(server.address, CHUNK)
    other = RemoteCacheClient(server.address, CHUNK * 2)
    try:
        fill(a, [1])
        assert other.lookup([key(1)]) == 0
        assert other.counters["errors"] == 1
        assert any("another model, dtype or chunk_tokens" in r.getMessage() for r in caplog.records)
    finally:
        a.close()
        other.close()


def test_pins_of_a_client_that_died_expire(server: Server, tmp_path: Path) -> None:
    a = RemoteCacheClient(server.address, CHUNK)
    try:
        fill(a, [1])
    finally:
        a.close()
    script = (f"import os, time\nfrom pdfabric.cache.client import RemoteCacheClient\n"
              f"c = RemoteCacheClient('{server.address}', {CHUNK})\n"
              f"p = c.read([bytes([1]) * 16])\nassert p.found == 1\nprint('pinned', flush=True)\ntime.sleep(60)\n")
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == b"pinned"
        assert server.metrics()["pdfabric_cache_server_open_leases"] == 1
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(5)
        assert child.stdout is not None
        child.stdout.close()
    deadline = time.monotonic() + 10
    while server.metrics()["pdfabric_cache_server_open_leases"] != 0:
        assert time.monotonic() < deadline, "the dead client's lease never expired"
        time.sleep(0.2)
    assert server.metrics()["pdfabric_cache_server_expired_leases_total"] == 1
    b = RemoteCacheClient(server.address, CHUNK)
    try:
        with b.read([key(1)]) as pinned:  # nothing was lost
            assert pinned.views[0] is not None and bytes(pinned.views[0]) == pattern(1)
    finally:
        b.close()


def test_a_restarted_server_finds_its_disk_tier_and_clients_reconnect(tmp_path: Path) -> None:
    s = Server(tmp_path).start()
    c = RemoteCacheClient(s.address, CHUNK, retry_after_s=0.2)
    try:
        fill(c, [1, 2])
        c.timeout_s = 5.0  # the first call to the restarted server waits for its connection (~0.5 s here)
        deadline = time.monotonic() + 10  # write-behind reaches the disk tier
        while disk_entries(s) < 2:
            assert time.monotonic() < deadline, s.get("/admin/stats")
            time.sleep(0.1)
        s.stop()
        t0 = time.monotonic()
        c.timeout_s = 0.5
        assert c.lookup([key(1)]) == 0  # down: a miss, quickly
        assert time.monotonic() - t0 < 1.5 and c.counters["errors"] >= 1
        c.timeout_s = 5.0
        s.start()
        time.sleep(0.3)  # past retry_after_s
        assert c.lookup([key(1), key(2)]) == 2  # L1 is new; L2 kept them
        with c.read([key(1), key(2)]) as pinned:
            assert [bytes(v) if v is not None else None for v in pinned.views] == [pattern(1), pattern(2)]
    finally:
        c.close()
        s.stop()


def test_a_client_idle_through_a_restart_greets_the_new_server_before_writing(tmp_path: Path) -> None:
    """A client that made no call while the server was down still holds the old server's
    arena (ZMQ reconnected underneath it). Its next write must land in the new server's
    arena - refused as not greeted, it says Hello again and maps the new one - or the
    chunk would be published with bytes nobody wrote (zeros), silently."""
    s = Server(tmp_path).start()
    # timeout_s: a new connection's first call waits for it (0.5 s can pass on a loaded machine)
    a = RemoteCacheClient(s.address, CHUNK, timeout_s=5)
    b: RemoteCacheClient | None = None
    try:
        fill(a, [1])
        s.stop()
        s.start()  # same port, a new arena; `a` saw nothing of it
        b = RemoteCacheClient(s.address, CHUNK, timeout_s=5)
        assert b.lookup([key(5)]) == 0  # b greets the new server
        fill(a, [5])
        assert a.counters["reconnects"] == 1 and a.counters["errors"] == 0
        with b.read([key(5)]) as pinned:
            assert pinned.views[0] is not None and bytes(pinned.views[0]) == pattern(5)
    finally:
        a.close()
        if b is not None:
            b.close()
        s.stop()


def test_a_lease_from_before_a_restart_never_ends_another_clients_lease(tmp_path: Path) -> None:
    """Lease numbers of a new server start anew: the end of a lease taken from the old one
    is not sent (it could commit another client's unwritten room), and the server ends a
    lease only for the connection it gave it to."""
    s = Server(tmp_path).start()
    a = RemoteCacheClient(s.address, CHUNK, timeout_s=5)
    b: RemoteCacheClient | None = None
    try:
        old1, old2 = a.reserve([key(1)]), a.reserve([key(3)])
        s.stop()
        s.start()
        b = RemoteCacheClient(s.address, CHUNK, timeout_s=5)
        room = b.reserve([key(2)])  # B's room on the new server, not written yet
        assert room.found == 1
        old1.close(commit=True)  # on A's old connection, which this server never greeted: refused
        assert a.counters["refused"] == 1 and a.counters["reconnects"] == 0
        assert a.lookup([key(9)]) == 0  # A greets the new server
        old2.close(commit=True)  # from the previous connection: not sent at all
        assert a.counters["stale_leases"] == 1 and a.counters["reconnects"] == 1
        assert b.lookup([key(2)]) == 0  # still B's, unpublished
        with room:
            assert room.views[0] is not None
            room.views[0][:] = pattern(2)
        with b.read([key(2)]) as pinned:
            assert pinned.views[0] is not None and bytes(pinned.views[0]) == pattern(2)
    finally:
        a.close()
        if b is not None:
            b.close()
        s.stop()


def test_an_idle_connection_is_forgotten_and_its_client_greets_again(tmp_path: Path) -> None:
    """The server keeps one entry per greeted connection; one silent past --forget-idle
    (holding no lease) is dropped, so engines restarted for weeks do not grow it. The
    forgotten client's next call is refused as not greeted, and it says Hello again on its
    own; a connection that holds a lease is kept however long it is silent."""
    s = Server(tmp_path, "--forget-idle", "2").start()
    a = RemoteCacheClient(s.address, CHUNK, name="engine-a", timeout_s=5)
    b = RemoteCacheClient(s.address, CHUNK, name="engine-b", timeout_s=5)
    try:
        fill(a, [1])
        room = b.reserve([key(2)])  # b holds a lease through the idle time
        deadline = time.monotonic() + 10
        while json.loads(s.get("/admin/stats")[1])["server"]["forgotten_connections"] < 1:
            assert time.monotonic() < deadline, s.get("/admin/stats")
            time.sleep(0.2)
        time.sleep(2.5)  # more sweeps: b's connection must stay
        stats = json.loads(s.get("/admin/stats")[1])
        assert stats["connections"] == 1 and stats["clients"] == ["engine-b"]
        assert stats["server"]["forgotten_connections"] == 1
        with room:
            assert room.views[0] is not None
            room.views[0][:] = pattern(2)
        assert b.counters["refused"] == 0 and b.counters["reconnects"] == 0
        assert a.lookup([key(1), key(2)]) == 2  # refused, greets again, asks again: answered
        assert a.counters["reconnects"] == 1 and a.counters["errors"] == 0
        assert "engine-a" in json.loads(s.get("/admin/stats")[1])["clients"]  # (b may be forgotten by now)
    finally:
        a.close()
        b.close()
        s.stop()


def test_arena_files_of_a_killed_server_are_removed_by_the_next_one(tmp_path: Path) -> None:
    s = Server(tmp_path).start()
    c = RemoteCacheClient(s.address, CHUNK)
    try:
        fill(c, [1])  # the arena exists once the first client said hello
    finally:
        c.close()
    assert s.proc is not None
    mine = list(SHM_DIR.glob(f"pdfabric-cache-{s.proc.pid}-*"))
    assert len(mine) == 1
    s.stop(signal.SIGKILL)
    assert mine[0].exists()
    s2 = Server(tmp_path).start()
    try:
        assert not mine[0].exists()
    finally:
        s2.stop()
    assert s2.proc is not None and not list(SHM_DIR.glob(f"pdfabric-cache-{s2.proc.pid}-*"))


def test_http_health_metrics_and_admin(server: Server) -> None:
    c = RemoteCacheClient(server.address, CHUNK)
    try:
        fill(c, [0x10, 0x11, 0x20])
        assert c.lookup([key(0x10)]) == 1
        status, body = server.get("/health")
        assert status == 200 and json.loads(body)["chunk_bytes"] == CHUNK
        m = server.metrics()
        assert m["pdfabric_cache_server_requests_total"] >= 3
        assert any(name.startswith("pdfabric_cache_") and "tier=" in name for name in m)
        status, body = server.post("/admin/evict?prefix=zz")
        assert status == 400 and "hex digits" in json.loads(body)["error"]["message"]
        status, body = server.post("/admin/evict?prefix=1010")
        assert status == 200 and json.loads(body)["removed"] >= 1
        assert c.lookup([key(0x10)]) == 0 and c.lookup([key(0x11)]) == 1
        status, body = server.post("/admin/clear")
        assert status == 200
        assert c.lookup([key(0x11)]) == 0 and c.lookup([key(0x20)]) == 0
        assert server.get("/nope")[0] == 404
        status, body = server.get("/admin/clear")  # a POST endpoint asked with GET
        assert status == 405 and "/admin/clear takes POST, not GET" in json.loads(body)["error"]["message"]
        req = urllib.request.Request(f"http://127.0.0.1:{server.http}/admin/stats", method="DELETE")
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=5)
        e.value.close()
        assert e.value.code == 405 and e.value.headers["Allow"] == "GET" and e.value.headers["Content-Type"] == "application/json"
    finally:
        c.close()


def test_health_lists_the_keyings_engines_said_most_recent_first(server: Server) -> None:
    clients = [RemoteCacheClient(server.address, CHUNK, name="worker"),  # no keys computed: no keying
               RemoteCacheClient(server.address, CHUNK, fingerprint="fp-a", chunk_tokens=64),
               RemoteCacheClient(server.address, CHUNK, fingerprint="fp-tenant", chunk_tokens=64, salted=True),
               RemoteCacheClient(server.address, CHUNK, fingerprint="fp-b", chunk_tokens=32),
               RemoteCacheClient(server.address, CHUNK, fingerprint="fp-a", chunk_tokens=64)]  # again: first
    try:
        for c in clients:
            assert c.lookup([key(1)]) == 0  # connects, says hello
        status, body = server.get("/health")
        assert status == 200
        assert json.loads(body)["keyings"] == [{"fingerprint": "fp-a", "chunk_tokens": 64},
                                               {"fingerprint": "fp-b", "chunk_tokens": 32}]
    finally:
        for c in clients:
            c.close()


def test_a_disk_tier_that_cannot_work_is_refused_at_start(tmp_path: Path) -> None:
    """Tiers are built at the first engine's hello; what makes a disk tier fail is checked
    when the server starts, so it does not run on and fail every engine."""
    afile = tmp_path / "afile"
    afile.write_text("x")
    r = subprocess.run([sys.executable, "-m", "pdfabric.cli", "cache-server", "--memory", "8MiB", "--disk", str(afile)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and r.stderr.startswith(f"error: --disk: the disk tier cannot use {afile}"), r.stderr
    s = Server(tmp_path).start()  # owns tmp_path / "l2" until stopped
    try:
        assert (tmp_path / "l2").is_dir()  # made at start, not at the first hello
        r = subprocess.run([sys.executable, "-m", "pdfabric.cli", "cache-server", "--memory", "8MiB",
                            "--disk", str(tmp_path / "l2"), "--port", "0"],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 2 and "is in use by another cache" in r.stderr and "Traceback" not in r.stderr, r.stderr
    finally:
        s.stop()


def test_a_port_that_cannot_be_bound_is_named(tmp_path: Path) -> None:
    import socket

    with socket.create_server(("127.0.0.1", 0)) as busy:
        taken = busy.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "pdfabric.cli", "cache-server", "--memory", "8MiB",
                            "--port", str(free_port()), "--http-port", str(taken)],
                           capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and f"cannot listen on 127.0.0.1:{taken} (HTTP)" in r.stderr, r.stderr
    r = subprocess.run([sys.executable, "-m", "pdfabric.cli", "cache-server", "--memory", "8MiB", "--port", "65535"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "--http-port: expected a port 0-65535, got 65536 (port + 1; give --http-port)" in r.stderr


def test_bad_flags_exit_2_naming_the_flag(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "pdfabric.cli", "cache-server", "--port", "0"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "--memory" in r.stderr
    r = subprocess.run([sys.executable, "-m", "pdfabric.cli", "cache-server", "--memory", "lots"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "--memory: expected a size like '4GiB'" in r.stderr and "got 'lots'" in r.stderr
    assert "Traceback" not in r.stderr and "Value error" not in r.stderr


@pytest.mark.parametrize(("argv", "expected"), [
    (["--memory", "1GiB", "--disk", "cache-dir", "--disk-size", "3zz"], "--disk-size: expected a size"),
    (["--memory", "1GiB", "--chunk-tokens", "0"], "--chunk-tokens: "),
    (["--memory", "1GiB", "--redis", "redis://u:pw@h/0"], "--redis: the URL holds a password; give it with --redis-password-env"),
    (["--memory", "1GiB", "--redis-password-env", "X"], "--redis-password-env: needs --redis URL"),
    (["--memory", "1GiB", "--disk-size", "1GiB"], "--disk-size: needs --disk DIR"),
    (["--topology", "TOPO", "--chunk-tokens", "128"], "either in --topology's cache section or as flags"),
    (["--topology", "TOPO", "--disk-size", "1GiB"], "either in --topology's cache section or as flags"),
    (["--memory", "1GiB", "--forget-idle", "0"], "--forget-idle: must be a positive number of seconds, got 0.0"),
    (["--memory", "1GiB", "--lease-ttl", "-5"], "--lease-ttl: must be a positive number of seconds, got -5.0"),
])
def test_bad_flag_combinations_name_the_flag(argv: list[str], expected: str) -> None:
    import argparse

    from pdfabric.commands import cache_server
    from pdfabric.errors import ConfigError

    parser = argparse.ArgumentParser()
    cache_server.register(parser.add_subparsers())
    topo = str(Path(__file__).parents[3] / "configs" / "cpu-1p1d-cache.yaml")
    args = parser.parse_args(["cache-server", *[topo if a == "TOPO" else a for a in argv]])
    with pytest.raises(ConfigError) as e:
        cache_server.config_from_args(args)
    assert expected in str(e.value)


def test_the_redis_password_comes_from_the_named_variable() -> None:
    import argparse

    from pdfabric.commands import cache_server

    parser = argparse.ArgumentParser()
    cache_server.register(parser.add_subparsers())
    args = parser.parse_args(["cache-server", "--memory", "1GiB", "--redis", "redis://127.0.0.1:6379/0",
                              "--redis-password-env", "PDFABRIC_TEST_REDIS_PW"])
    config, _, _ = cache_server.config_from_args(args)
    redis = config.tiers[1]
    assert redis.kind == "redis" and redis.password is not None and redis.password.describe() == "env PDFABRIC_TEST_REDIS_PW"
