"""The routing proxy's overhead: pdfabric's proxy against same-run baselines, all in front of
the same two instant fake engines (``pdfabric.testing.fake_engine``: one prefill, one
decode, child processes).

Rows (each its own server process):

- ``direct``: the load generator straight to the decode fake (the floor: no proxy).
- ``pdfabric``: ``pdfabric proxy`` (concurrent pairing, round_robin).
- ``toy``: a minimal sequential FastAPI + httpx P/D proxy (``pdfabric.bench.toy_proxy``),
  like vLLM's toy_proxy_server, served by uvicorn.
- ``vllm-router`` / ``sglang-router``: the Rust routers from PyPI in their PD modes
  (``--vllm-pd-disaggregation`` / ``--pd-disaggregation``), round_robin, log level warning.

The load generator (``pdfabric.bench.proxy_load``) is a process of its own. Per point
(streaming or not x concurrency) and round, each row in turn gets ``duration`` seconds of
closed-loop load after a short warm-up; a row's numbers are the medians over rounds. A
point during which other processes on the machine used more than ``max_other_pct`` of a
core is measured again once the machine is quiet (``disturbed`` counts the retries).
``added`` latency is the row's minus ``direct``'s at the same point; CPU per request is the
row's server process (and its children) user+sys time over the window, per request.
"""

from __future__ import annotations

import importlib.util
import json
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pdfabric.bench.proxy_load import machine_busy_s
from pdfabric.bench.proxy_report import format_report, summarize

__all__ = ["ROWS", "run_benchmark", "format_report"]

ROWS = ("direct", "pdfabric", "toy", "vllm-router", "sglang-router")
PROMPT = "San Francisco is a"
MODEL = "fake-model"
_PY = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class StartFailed(RuntimeError):
    pass


@dataclass
class Server:
    """A child process whose stdout and stderr go to ``log``."""

    name: str
    argv: list[str]
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    url: str = ""

    def start(self) -> None:
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(re.sub(r"\x1b\[[0-9;]*m", "", x) for x in text.splitlines()[-lines:])

    def check_alive(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise StartFailed(f"{self.name} exited with status {self.proc.returncode}:\n{self.tail()}")

    def wait_line(self, pattern: str, timeout: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(pattern, self.log.read_text(errors="replace"))
            if m:
                return m
            self.check_alive()
            time.sleep(0.05)
        raise StartFailed(f"{self.name}: no line matching {pattern!r} after {timeout:.0f}s:\n{self.tail()}")

    def wait_serving(self, body: dict[str, Any], timeout: float) -> None:
        """Until a completion through it answers 200 (routers register workers late)."""
        deadline, last = time.monotonic() + timeout, ""
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                status, last = post(self.url + "/v1/completions", body)
                if status == 200:
                    return
            except OSError as e:
                last = repr(e)
            time.sleep(0.2)
        raise StartFailed(f"{self.name}: no 200 answer after {timeout:.0f}s (last: {last[:200]}):\n{self.tail()}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def post(url: str, body: dict[str, Any], timeout: float = 5.0) -> tuple[int, str]:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def _row_argv(row: str, port: int, p_url: str, p_control: str, d_url: str) -> list[str]:
    host = "127.0.0.1"
    if row == "pdfabric":
        return [_PY, "-m", "pdfabric.cli", "proxy", "--prefill", f"{p_url}@{p_control}", "--decode", d_url,
                "--host", host, "--port", str(port), "--policy", "round_robin", "--pairing", "concurrent",
                "--model", MODEL]
    if row == "toy":
        return [_PY, "-m", "pdfabric.bench.toy_proxy", "--host", host, "--port", str(port),
                "--prefill", p_url, "--decode", d_url]
    if row == "vllm-router":
        return [_PY, "-m", "vllm_router.launch_router", "--vllm-pd-disaggregation", "--prefill", p_url,
                "--decode", d_url, "--host", host, "--port", str(port), "--policy", "round_robin",
                "--prometheus-host", host, "--prometheus-port", str(free_port()), "--log-level", "warning"]
    if row == "sglang-router":
        return [_PY, "-m", "sglang_router.launch_router", "--pd-disaggregation", "--prefill", p_url,
                "--decode", d_url, "--host", host, "--port", str(port), "--policy", "round_robin",
                "--prometheus-host", host, "--prometheus-port", str(free_port()), "--log-level", "warn"]
    raise ValueError(f"unknown row {row!r}; rows are {', '.join(ROWS)}")


_NEEDS = {"toy": ("fastapi", "httpx", "uvicorn"), "vllm-router": ("vllm_router",), "sglang-router": ("sglang_router",)}
_INSTALL = {"toy": "fastapi httpx uvicorn", "vllm-router": "vllm-router", "sglang-router": "sglang-router"}
ROW_NOTES = {
    "sglang-router": "SGLang PD protocol: the same request (full max_tokens, stream as asked) goes to prefill "
                     "and decode at once with bootstrap_host/port/room; the fake ignores those fields. Streaming: "
                     "0.3.2 sets no TCP_NODELAY on client connections (strace: no setsockopt after accept), so "
                     "with a keep-alive client each streamed answer waits ~40 ms (Nagle + delayed ACK)",
    "vllm-router": "vLLM PD protocol (NIXL params): prefill max_tokens=1 stream=false, then decode with the "
                   "prefill's kv_transfer_params (the fake answers null to NIXL params)",
    "toy": "sequential; no access log, unlimited httpx pools (both in its favour)",
    "pdfabric": "concurrent pairing, round_robin",
}


@dataclass
class Stack:
    """The two fakes and one server per row; rows that cannot run are in ``skipped``."""

    rows: Sequence[str]
    log_dir: Path
    tokens: int
    start_timeout: float = 60.0
    servers: dict[str, Server] = field(default_factory=dict)
    fakes: list[Server] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    def probe_body(self) -> dict[str, Any]:
        return {"model": MODEL, "prompt": PROMPT, "max_tokens": self.tokens}

    def start(self) -> None:
        for role in ("prefill", "decode"):
            self.fakes.append(Server(f"fake-{role}", [_PY, "-m", "pdfabric.testing.fake_engine", "--port", "0",
                                                      "--role", role, "--name", f"fake-{role}", "--model", MODEL,
                                                      "--tokens", str(self.tokens), "--no-record"],
                                     self.log_dir / f"fake-{role}.log"))
        for f in self.fakes:
            f.start()
        for f in self.fakes:
            f.url = f.wait_line(r"on (http://\S+)", self.start_timeout).group(1)
        pending = [self._start_row(row) for row in self.rows]
        for server in [s for s in pending if s is not None]:
            self._await_row(server)

    def _start_row(self, row: str) -> Server | None:
        missing = [m for m in _NEEDS.get(row, ()) if importlib.util.find_spec(m) is None]
        if missing:
            self.skipped[row] = (f"not installed ({', '.join(missing)}): "
                                 f"{_PY} -m pip install {_INSTALL[row]}")
            return None
        if row == "direct":
            self.servers[row] = Server(row, [], Path(), url=self.fakes[1].url)
            return None
        p_url, d_url = self.fakes[0].url, self.fakes[1].url
        server = Server(row, _row_argv(row, free_port(), p_url, p_url.removeprefix("http://"), d_url),
                        self.log_dir / f"{row}.log")
        server.url = "http://127.0.0.1:" + server.argv[server.argv.index("--port") + 1]
        server.start()
        return server

    def _await_row(self, server: Server) -> None:
        try:
            server.wait_serving(self.probe_body(), self.start_timeout)
        except StartFailed as e:
            server.stop()
            self.skipped[server.name] = f"could not start: {e}"
            return
        self.servers[server.name] = server

    def cpu_pids(self, row: str) -> dict[str, list[int]]:
        server = self.servers[row]
        return {"proxy": [server.pid] if server.proc is not None else [],
                "engines": [f.pid for f in self.fakes]}

    def stop(self) -> None:
        for s in [*self.servers.values(), *self.fakes]:
            s.stop()


class LoadGen:
    """The load generator child (``pdfabric.bench.proxy_load``): one JSON line each way."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([_PY, "-m", "pdfabric.bench.proxy_load"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, start_new_session=True)
        assert self.proc.stdout is not None
        if "ready" not in self.proc.stdout.readline():
            raise RuntimeError("the load generator did not start")

    def measure(self, cmd: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the load generator exited ({self.proc.poll()})")
        out: dict[str, Any] = json.loads(line)
        if "fatal" in out:
            raise RuntimeError(f"the load generator failed: {out['fatal']}")
        return out

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def _points(concurrency: Sequence[int]) -> list[tuple[bool, int]]:
    return [(stream, c) for stream in (False, True) for c in concurrency]


def wait_quiet(max_other_pct: float, timeout: float = 120.0, window: float = 2.0) -> float:
    """Until the rest of the machine (our servers idle) uses under ``max_other_pct`` of one
    core over ``window`` seconds, or ``timeout`` passed; the last busy percentage seen."""
    deadline = time.monotonic() + timeout
    while True:
        before = machine_busy_s()
        time.sleep(window)
        busy = 100.0 * (machine_busy_s() - before) / window
        if busy < max_other_pct or time.monotonic() > deadline:
            return busy


def _measure(gen: LoadGen, cmd: dict[str, Any], max_other_pct: float, tries: int = 4) -> dict[str, Any]:
    """One point; measured again (after the machine calms down) while other processes used
    more than ``max_other_pct`` of a core during it. ``disturbed``: the tries thrown away."""
    for attempt in range(tries):
        res = gen.measure(cmd)
        other = res["cpu_pct"].get("other", 0.0)
        if other <= max_other_pct or attempt == tries - 1:
            res["disturbed"] = attempt
            return res
        print(f"  (other processes used {other:.0f}% of a core: measuring again when quiet)", file=sys.stderr,
              flush=True)
        wait_quiet(max_other_pct)
    raise AssertionError("unreachable")


def _measure_all(stack: Stack, gen: LoadGen, *, rounds: int, duration: float, warmup: float,
                 concurrency: Sequence[int], progress: bool,
                 max_other_pct: float) -> dict[tuple[str, bool, int], list[dict[str, Any]]]:
    ready = [r for r in stack.rows if r in stack.servers]
    samples: dict[tuple[str, bool, int], list[dict[str, Any]]] = {}
    for rnd in range(rounds):
        order = ready[rnd % len(ready):] + ready[:rnd % len(ready)]  # no row always first
        for stream, c in _points(concurrency):
            for row in order:
                body = {**stack.probe_body(), "stream": stream}
                cmd = {"url": stack.servers[row].url + "/v1/completions", "concurrency": c, "duration": duration,
                       "warmup": warmup, "body": body, "cpu_pids": stack.cpu_pids(row)}
                res = _measure(gen, cmd, max_other_pct)
                samples.setdefault((row, stream, c), []).append(res)
                if progress:
                    print(f"  round {rnd + 1}/{rounds} {'stream' if stream else 'plain':6} c={c:<3} {row:14} "
                          f"{res['rps']:8.0f} req/s  p50 {res['p50_ms']:6.2f} ms  errors {res['errors']}"
                          f"+{res['non200']}  other {res['cpu_pct'].get('other', 0):.0f}%", file=sys.stderr,
                          flush=True)
    return samples


def run_benchmark(rows: Sequence[str] = ROWS, *, duration: float = 10.0, rounds: int = 3,
                  concurrency: Sequence[int] = (1, 64), tokens: int = 8, warmup: float | None = None,
                  log_dir: Path | None = None, progress: bool = True, max_other_pct: float = 25.0) -> dict[str, Any]:
    """Start everything, measure every point, stop everything; the report (JSON-able)."""
    bad = [r for r in rows if r not in ROWS]
    if bad:
        raise ValueError(f"unknown row(s) {bad}; rows are {', '.join(ROWS)}")
    warmup = max(0.2, min(1.0, duration / 10)) if warmup is None else warmup
    tmp = None if log_dir is not None else tempfile.TemporaryDirectory(prefix="pdfabric-proxy-bench-")
    logs = Path(tmp.name) if tmp is not None else Path(log_dir)  # type: ignore[arg-type]
    logs.mkdir(parents=True, exist_ok=True)
    stack = Stack(list(rows), logs, tokens)
    gen = None
    try:
        stack.start()
        if "direct" not in stack.servers:
            raise RuntimeError("the direct row is needed for added latency (and it could not run)")
        gen = LoadGen()
        samples = _measure_all(stack, gen, rounds=rounds, duration=duration, warmup=warmup,
                               concurrency=concurrency, progress=progress, max_other_pct=max_other_pct)
    finally:
        if gen is not None:
            gen.close()
        stack.stop()
        if tmp is not None:
            tmp.cleanup()
    config = {"rows": list(rows), "duration_s": duration, "rounds": rounds, "warmup_s": warmup,
              "concurrency": list(concurrency), "max_tokens": tokens, "prompt": PROMPT,
              "python": sys.version.split()[0], "cpus": _cpus(), "max_other_pct": max_other_pct}
    return summarize(samples, config, stack.skipped, {r: ROW_NOTES[r] for r in rows if r in ROW_NOTES})


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0))
