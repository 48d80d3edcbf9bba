"""Start, watch and stop the processes of a launch.

Each process runs in its own process group with its output in ``<log_dir>/<name>.log``.
``start`` starts every engine at once (they load in parallel), waits until each answers
``/health`` - showing per process: starting, loading, ready, failed, with elapsed time -
then starts the proxy. A process that exits early fails the launch with the tail of its
log; ``stop`` sends SIGTERM to every group, waits, then SIGKILLs what is left. Nothing is
found or killed by name: only the process ids this object started.

While serving, ``supervise`` restarts a process that exits (policy ``always``), and one that
hangs: alive, but its health endpoint (``/live`` for the proxy, whose ``/health`` waits for
a decode engine) has not answered for ``hang_s``. What is left of its process group is
killed first (a vLLM engine's core process outlives its API server), then it starts again
with the same command after a back-off (1 s, doubling, at most 30 s), its log appended to.
One that is not ready again within the launch's timeout after a restart is killed and
counts as another end. A process that ends more than ``max_restarts`` times within
``RESTART_WINDOW_S``, or more than ``max_restarts`` times in a row without serving in
between, stops the launch; so does any end with policy ``never``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.live import Live
from rich.table import Table

from pdfabric.launch.plan import ProcSpec

__all__ = ["LaunchFailed", "Proc", "Runner", "RESTART_WINDOW_S"]

RESTART_WINDOW_S = 600.0
_BACKOFF_MAX_S = 30.0
_PROBE_S = 5.0  # how often a serving process's health endpoint is asked


class LaunchFailed(RuntimeError):
    def __init__(self, name: str, why: str, tail: str) -> None:
        super().__init__(f"{name} {why}")
        self.name, self.why, self.tail = name, why, tail


@dataclass
class Proc:
    spec: ProcSpec
    log_path: Path
    popen: subprocess.Popen[bytes] | None = None
    started: float = field(default_factory=time.monotonic)
    state: str = "pending"
    ready_after: float | None = None
    exits: list[float] = field(default_factory=list)  # monotonic times it ended while serving
    restart_at: float = 0.0
    probed_at: float = 0.0
    failing_since: float | None = None  # its health endpoint has not answered since then

    @property
    def live_url(self) -> str:
        """Whether it is alive (the proxy's ``/health`` is about its engines)."""
        base = self.spec.ready_url.rsplit("/", 1)[0]
        return base + "/live" if self.spec.kind == "proxy" else self.spec.ready_url

    def tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"


class Runner:
    def __init__(self, plan: list[ProcSpec], log_dir: Path, console: Console | None = None) -> None:
        self.log_dir = log_dir
        self.console = console or Console(stderr=True)
        self.procs = [Proc(s, log_dir / f"{s.name}.log") for s in plan]

    def start(self, timeout: float = 600.0) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        caches = [p for p in self.procs if p.spec.kind == "cache"]
        engines = [p for p in self.procs if p.spec.kind == "engine"]
        rest = [p for p in self.procs if p.spec.kind not in ("cache", "engine")]
        # the ports of the groups started later are held until then: engines loading for
        # minutes open many connections, and one could get a later port as its own local port
        held = {p.spec.name: _reserve(p.spec.ports) for p in engines + rest}
        try:
            with Live(self._table(), console=self.console, refresh_per_second=4, transient=False) as live:
                for group in (caches, engines, rest):
                    if not group:
                        continue
                    for p in group:
                        for s in held.pop(p.spec.name, []):
                            s.close()
                        self._spawn(p)
                    self._wait(group, timeout, live)
        finally:
            for socks in held.values():
                for s in socks:
                    s.close()

    def _spawn(self, p: Proc, append: bool = False) -> None:
        env = {**os.environ, **p.spec.env}
        cpus = set(p.spec.cpus)
        with open(p.log_path, "ab" if append else "wb") as log:
            if append:
                log.write(f"\n--- pdfabric launch: restart {len(p.exits)} at {time.strftime('%H:%M:%S')} ---\n".encode())
                log.flush()
            p.popen = subprocess.Popen(p.spec.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       env=env, start_new_session=True,
                                       preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)
        p.started, p.state = time.monotonic(), "starting"
        self._write_pids()

    def _write_pids(self) -> None:
        """``<log_dir>/pids.json``: every process this launch started (tests check them)."""
        pids = {p.spec.name: p.popen.pid for p in self.procs if p.popen is not None}
        tmp = self.log_dir / "pids.json.tmp"
        tmp.write_text(json.dumps(pids))
        tmp.replace(self.log_dir / "pids.json")  # a reader never sees it half written

    def _wait(self, group: list[Proc], timeout: float, live: Live) -> None:
        deadline = time.monotonic() + timeout
        while any(p.state != "ready" for p in group):
            for p in group:
                if p.state == "ready":
                    continue
                assert p.popen is not None
                if p.popen.poll() is not None:
                    p.state = "failed"
                    live.update(self._table())
                    raise LaunchFailed(p.spec.name, f"exited with code {p.popen.returncode} while starting", p.tail())
                if _healthy(p.spec.ready_url):
                    p.state, p.ready_after = "ready", time.monotonic() - p.started
                elif p.state == "starting" and _loading(p.log_path):
                    p.state = "loading"
            live.update(self._table())
            if time.monotonic() > deadline:
                late = next(p for p in group if p.state != "ready")
                raise LaunchFailed(late.spec.name, f"not ready after {timeout:g}s", late.tail())
            time.sleep(0.5)

    def _table(self) -> Table:
        t = Table(title="pdfabric launch", show_lines=False)
        for col in ("process", "state", "elapsed", "endpoint", "log"):
            t.add_column(col)
        now = time.monotonic()
        colors = {"ready": "green", "failed": "red", "loading": "yellow", "starting": "cyan", "pending": "dim"}
        for p in self.procs:
            took = p.ready_after if p.ready_after is not None else (now - p.started if p.popen else 0.0)
            url = p.spec.ready_url.rsplit("/", 1)[0]
            t.add_row(escape(p.spec.name), f"[{colors.get(p.state, 'white')}]{p.state}[/]", f"{took:5.1f}s", escape(url),
                      escape(str(p.log_path)))
        return t

    def supervise(self, policy: str, max_restarts: int, timeout: float, hang_s: float = 60.0,
                  tick: float = 0.5) -> str:
        """Serve until a process cannot be kept running; returns why (see the module doc).
        ``hang_s`` 0: a process is restarted only when it exits."""
        while True:
            for p in self.procs:
                why = self._watch(p, time.monotonic(), policy, max_restarts, timeout, hang_s)
                if why is not None:
                    return why
            time.sleep(tick)

    def _watch(self, p: Proc, now: float, policy: str, max_restarts: int, timeout: float,
               hang_s: float) -> str | None:
        if p.popen is None:
            return None
        if p.state == "backoff":
            if now >= p.restart_at:
                self._spawn(p, append=True)
                p.state, p.failing_since = "restarting", None
            return None
        code = p.popen.poll()
        if code is None:
            if p.state == "restarting":
                # ready again once it serves: a restarted proxy's /health may wait for a decode
                # engine an operator drained (its admin changes are kept), so /live for it
                if _healthy(p.live_url):
                    p.state, p.ready_after = "ready", now - p.started
                    self.console.print(f"{escape(p.spec.name)} is ready again after {p.ready_after:.0f}s")
                    return None
                if now - p.started <= timeout:
                    return None
                what = f"{p.spec.name} was not ready again {timeout:g}s after its restart"
            elif self._hung(p, now, hang_s):
                what = f"{p.spec.name} has not answered {p.live_url} for {now - (p.failing_since or now):.0f}s"
            else:
                return None
            self.console.print(f"[yellow]{escape(what)}[/]: killing it")
        else:
            what = f"{p.spec.name} exited with code {code}"
        _kill_group(p.popen.pid, self.console)  # what is left of it (a vLLM engine's core process)
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.popen.wait(5)  # reaped (a hung one was killed just now)
        now = time.monotonic()  # the back-off runs from here (the kill may have taken seconds)
        # ends older than the window are forgotten only once it served again since: restarts
        # that never get ready (each one --timeout apart) add up to --max-restarts too
        in_a_row = p.state == "restarting"
        recent = p.exits if in_a_row else [t for t in p.exits if now - t < RESTART_WINDOW_S]
        p.exits = [*recent, now]
        if policy == "never":
            return what
        if len(p.exits) > max_restarts:
            when = "in a row without serving" if now - p.exits[0] >= RESTART_WINDOW_S else \
                f"within {RESTART_WINDOW_S / 60:g} minutes"
            return f"{what}; it ended {len(p.exits)} times {when}, more than --max-restarts {max_restarts}"
        delay = min(_BACKOFF_MAX_S, 2.0 ** (len(p.exits) - 1))
        p.state, p.restart_at = "backoff", now + delay
        self.console.print(f"[yellow]{escape(what)}[/]; restarting it in {delay:g}s "
                           f"(restart {len(p.exits)} of at most {max_restarts} within {RESTART_WINDOW_S / 60:g} minutes); "
                           f"log: {escape(str(p.log_path))}")
        return None

    def _hung(self, p: Proc, now: float, hang_s: float) -> bool:
        """Ask a serving process's health endpoint every ``_PROBE_S``; True once it has not
        answered for ``hang_s``."""
        if hang_s <= 0 or now - p.probed_at < _PROBE_S:
            return False
        p.probed_at = now
        if _healthy(p.live_url):
            p.failing_since = None
            return False
        if p.failing_since is None:
            p.failing_since = now
        return now - p.failing_since >= hang_s

    def alive(self) -> list[Proc]:
        return [p for p in self.procs if p.popen is not None and p.popen.poll() is None]

    def stop(self, grace: float = 20.0) -> None:
        """SIGTERM every group (proxy first), wait up to ``grace``, then SIGKILL; always waits."""
        for p in reversed(self.procs):
            if p.popen is not None and p.popen.poll() is None:
                _signal_group(p.popen.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for p in reversed(self.procs):
            if p.popen is None:
                continue
            try:
                p.popen.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            _signal_group(p.popen.pid, signal.SIGKILL)  # children of the group (engine core, workers)
            if p.popen.poll() is None:
                p.popen.wait(10)


def _reserve(ports: tuple[tuple[str, int], ...]) -> list[socket.socket]:
    """Sockets bound (not listening) to ``ports``: while they are, the kernel gives none of
    them to an outgoing connection as its local port. A port that cannot be bound now is
    left alone (preflight found it free; the process will say if it is not)."""
    out: list[socket.socket] = []
    for host, port in ports:
        if not port:
            continue
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        s = socket.socket(family, socket.SOCK_STREAM)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind: TIME_WAIT is no obstacle
            s.bind((host, port))
        except OSError:
            s.close()
            continue
        out.append(s)
    return out


def _kill_group(pgid: int, console: Console, wait: float = 10.0) -> None:
    """SIGKILL a process group and wait (bounded) until none of it is left running; says so
    when some of it outlives the wait (a restart may then find its ports still taken)."""
    _signal_group(pgid, signal.SIGKILL)
    deadline = time.monotonic() + wait
    while (left := _running_in_group(pgid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    if left:
        console.print(f"[yellow]process group {pgid}: {left} still running {wait:g}s after SIGKILL[/]")


def _running_in_group(pgid: int) -> list[int]:
    """Processes of group ``pgid`` that are not zombies (an orphan's zombie stays until its
    new parent reaps it, and holds nothing)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2:].split()  # after "pid (comm) ": state, ppid, pgrp
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            out.append(int(stat.parent.name))
    return out


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1.0) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _loading(log: Path) -> bool:
    try:
        with open(log, "rb") as f:
            return b"load model" in f.read()
    except OSError:
        return False
