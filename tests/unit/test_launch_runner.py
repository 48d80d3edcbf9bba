"""The launcher's restart rules (``pdfabric.launch.runner``) on a fake clock, with real
processes (``sleep``) that never answer their health endpoint."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from rich.console import Console

from pdfabric.launch import runner as runner_mod
from pdfabric.launch.plan import ProcSpec
from pdfabric.launch.runner import RESTART_WINDOW_S, Runner


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(runner_mod.time, "monotonic", c)
    return c


def _runner(tmp_path: Path, kind: str = "engine") -> Runner:
    spec = ProcSpec(name="e", kind=kind, argv=["sleep", "600"], env={}, ready_url="http://127.0.0.1:9/health")
    r = Runner([spec], tmp_path, Console(file=io.StringIO(), width=400))
    tmp_path.mkdir(parents=True, exist_ok=True)
    return r


@pytest.mark.parametrize("timeout", [15.0, 600.0, 3600.0])
def test_restarts_that_never_get_ready_stop_the_launch_whatever_the_timeout(tmp_path: Path, clock: Clock,
                                                                           timeout: float) -> None:
    """Each failed restart is one --timeout after the previous end; with a timeout as long as
    the restart window the ends must still add up (they once aged out one by one, forever)."""
    r = _runner(tmp_path)
    p = r.procs[0]
    try:
        r._spawn(p)
        p.state = "restarting"  # as after its first end: it must get ready again
        p.exits = [clock.now]
        why = None
        for _ in range(10):
            clock.now = p.started + timeout + 1  # not ready in time
            why = r._watch(p, clock.now, "always", 3, timeout, 0)
            if why is not None:
                break
            assert p.state == "backoff"
            clock.now = p.restart_at
            assert r._watch(p, clock.now, "always", 3, timeout, 0) is None and p.state == "restarting"
        assert why is not None, "the launch never stopped"
        assert f"was not ready again {timeout:g}s after its restart" in why and "more than --max-restarts 3" in why
        assert ("in a row without serving" if timeout * 3 >= RESTART_WINDOW_S else "within 10 minutes") in why
        assert len(p.exits) == 4
        out = r.console.file.getvalue()  # type: ignore[attr-defined]
        assert "restart 3 of at most 3" in out and "restart 4" not in out
    finally:
        r.stop(grace=5)
    assert r.alive() == []


def test_a_process_that_served_again_starts_a_new_count_after_the_window(tmp_path: Path, clock: Clock) -> None:
    r = _runner(tmp_path)
    p = r.procs[0]
    try:
        r._spawn(p)
        p.state, p.exits = "ready", [clock.now - 10, clock.now - 5, clock.now]  # three ends, then it served
        clock.now += RESTART_WINDOW_S + 1
        assert p.popen is not None
        p.popen.kill()
        p.popen.wait(10)
        assert r._watch(p, clock.now, "always", 3, 60, 0) is None  # the old ends aged out
        assert p.state == "backoff" and len(p.exits) == 1
    finally:
        r.stop(grace=5)


def test_a_restarted_proxy_is_ready_again_once_it_serves(tmp_path: Path, clock: Clock,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Its /health waits for a decode engine (an operator may have drained the only one):
    after a restart the proxy counts as ready on /live."""
    asked: list[str] = []
    monkeypatch.setattr(runner_mod, "_healthy", lambda url: asked.append(url) or url.endswith("/live"))
    r = _runner(tmp_path, kind="proxy")
    p = r.procs[0]
    try:
        r._spawn(p)
        p.state = "restarting"
        assert r._watch(p, clock.now + 1, "always", 3, 60, 0) is None
        assert p.state == "ready" and asked == ["http://127.0.0.1:9/live"]
    finally:
        r.stop(grace=5)


_RESERVE_CHECK = """
import socket, subprocess
from pdfabric.launch.runner import _reserve
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
with open("/proc/sys/net/ipv4/ip_local_port_range", "w") as f:
    f.write("40000 40009")  # this network namespace's own: ten local ports
lst = socket.create_server(("127.0.0.1", 5000))
held = _reserve((("127.0.0.1", 40005), ("127.0.0.1", 0)))
used, conns = [], []
for _ in range(12):
    c = socket.socket()
    try:
        c.connect(("127.0.0.1", 5000))
    except OSError:
        break
    used.append(c.getsockname()[1])
    conns.append(c)
print(len(held), sorted(used))
"""


def test_ports_of_later_processes_are_not_given_to_outgoing_connections() -> None:
    """Engines load for minutes and open many connections; the proxy's port, held bound
    until the proxy starts, is never one of their local ports. Checked in a network
    namespace of its own whose local port range is ten ports."""
    import shutil
    import subprocess
    import sys

    if shutil.which("unshare") is None or shutil.which("ip") is None:
        pytest.skip("needs unshare and ip (util-linux, iproute2) for a network namespace")
    r = subprocess.run(["unshare", "-n", sys.executable, "-c", _RESERVE_CHECK], capture_output=True, text=True,
                       timeout=60)
    if r.returncode != 0 and ("Operation not permitted" in r.stderr or "Permission denied" in r.stderr):
        pytest.skip(f"cannot make a network namespace here: {r.stderr.strip()[-200:]}")
    assert r.returncode == 0, r.stderr
    held, used = r.stdout.split(" ", 1)
    assert held == "1"  # port 0 is nothing to hold
    assert used.strip() == str([p for p in range(40000, 40010) if p != 40005])  # all but the held one
