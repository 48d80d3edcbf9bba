"""The load generator of the proxy benchmark: a child process of its own (asyncio, uvloop,
one aiohttp session with keep-alive per measurement, a closed loop of ``concurrency``
workers).

It reads one JSON command a line on stdin and answers one JSON line on stdout::

    {"url": "http://127.0.0.1:8000/v1/completions", "concurrency": 64, "stream": false,
     "duration": 10, "warmup": 1, "body": {...}, "cpu_pids": {"proxy": [123], "engines": [4, 5]}}

Every worker sends requests back to back from the start; the measured window opens after
``warmup`` seconds and lasts ``duration`` seconds. Counted in the window: requests that
completed in it (latency: from sending the request to the last byte of the answer; for a
stream also to its first bytes), and the CPU time (user + sys, clock ticks of
``/proc/<pid>/stat``, a process and its descendants) of each group of ``cpu_pids``, of
this process, and of everything else on the machine (``other``: a disturbed measurement). Errors (exceptions, an answer cut short) and non-200 answers are counted
over the whole run, warm-up included.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

__all__ = ["tree_cpu_s", "machine_busy_s", "percentile", "measure", "main"]

_TICK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, user + sys seconds) of one process, or None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    fields = raw[raw.rindex(b")") + 2:].split()  # after "pid (comm) ": state is fields[0]
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / _TICK


def tree_cpu_s(pids: list[int]) -> float:
    """CPU seconds (user + sys) of the processes ``pids`` and all their live descendants."""
    parents: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = _stat(int(name))
            if st is not None:
                parents[int(name)], cpu[int(name)] = st
    roots = set(pids)
    total = 0.0
    for pid, t in cpu.items():
        p = pid
        while p and p not in roots:
            p = parents.get(p, 0)
        if p:
            total += t
    return total


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of an ascending list; NaN for an empty one."""
    if not sorted_values:
        return float("nan")
    k = max(0, min(len(sorted_values) - 1, math.ceil(q / 100.0 * len(sorted_values)) - 1))
    return sorted_values[k]


@dataclass
class _Run:
    url: str
    body: bytes
    stream: bool
    stop_at: float  # no request starts after this (perf_counter)
    done: list[tuple[float, float, float]] = field(default_factory=list)  # (end, latency, first bytes)
    errors: int = 0
    non200: int = 0
    first_error: str = ""

    def fail(self, why: str) -> None:
        self.errors += 1
        self.first_error = self.first_error or why


async def _one(run: _Run, session: aiohttp.ClientSession) -> None:
    t = time.perf_counter()
    first = 0.0
    async with session.post(run.url, data=run.body) as resp:
        if resp.status != 200:
            await resp.read()
            run.non200 += 1
            run.first_error = run.first_error or f"HTTP {resp.status}"
            return
        if run.stream:
            tail = b""
            async for chunk in resp.content.iter_any():
                if not first:
                    first = time.perf_counter()
                tail = (tail + chunk)[-16:]
            if not tail.endswith(b"[DONE]\n\n"):
                run.fail(f"stream without data: [DONE] (ends {tail!r})")
                return
        else:
            data = await resp.read()
            if not data.startswith(b"{"):
                run.fail(f"answer is not a JSON object: {data[:60]!r}")
                return
    end = time.perf_counter()
    run.done.append((end, end - t, (first or end) - t))


async def _worker(run: _Run, session: aiohttp.ClientSession) -> None:
    while time.perf_counter() < run.stop_at:
        try:
            await _one(run, session)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            run.fail(repr(e))
            await asyncio.sleep(0.01)  # a refused connection is not a busy loop


def machine_busy_s() -> float:
    """CPU seconds the whole machine spent busy (all cores, ``/proc/stat``)."""
    with open("/proc/stat", "rb") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    return (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / _TICK  # user nice system irq softirq steal


def _cpu(groups: dict[str, list[int]]) -> dict[str, float]:
    out = {name: tree_cpu_s(pids) for name, pids in groups.items()}
    out["loadgen"] = time.process_time()
    out["machine"] = machine_busy_s()
    return out


async def _sampler(window: list[float], cpu: list[dict[str, float]], groups: dict[str, list[int]],
                   opens: float, closes: float) -> None:
    """Mark the window's real bounds (a late timer widens nothing) and CPU at both ends."""
    for at in (opens, closes):
        await asyncio.sleep(max(0.0, at - time.perf_counter()))
        cpu.append(_cpu(groups))
        window.append(time.perf_counter())


def _summary(run: _Run, window: list[float], cpu: list[dict[str, float]]) -> dict[str, Any]:
    t0, t1 = window
    inside = [d for d in run.done if t0 <= d[0] <= t1]
    lat = sorted(d[1] for d in inside)
    ttfb = sorted(d[2] for d in inside)
    n, span = len(inside), t1 - t0
    cpu_s = {k: cpu[1][k] - cpu[0][k] for k in cpu[0]}
    # what else ran on the machine meanwhile (other processes: a disturbed measurement)
    cpu_s["other"] = max(0.0, cpu_s.pop("machine") - sum(cpu_s.values()))
    return {
        "requests": n, "seconds": span, "rps": n / span if span > 0 else 0.0,
        "p50_ms": percentile(lat, 50) * 1e3, "p99_ms": percentile(lat, 99) * 1e3,
        "mean_ms": (sum(lat) / n * 1e3) if n else float("nan"), "ttfb_p50_ms": percentile(ttfb, 50) * 1e3,
        "errors": run.errors, "non200": run.non200, "first_error": run.first_error,
        "cpu_s": cpu_s, "cpu_pct": {k: 100.0 * v / span for k, v in cpu_s.items()},
    }


async def measure(cmd: dict[str, Any]) -> dict[str, Any]:
    """One measurement point (see the module doc for ``cmd``)."""
    conc, warmup, duration = int(cmd["concurrency"]), float(cmd["warmup"]), float(cmd["duration"])
    start = time.perf_counter()
    run = _Run(cmd["url"], json.dumps(cmd["body"]).encode(), bool(cmd["body"].get("stream")),
               start + warmup + duration)
    window: list[float] = []
    cpu: list[dict[str, float]] = []
    conn = aiohttp.TCPConnector(limit=0, keepalive_timeout=60)
    timeout = aiohttp.ClientTimeout(total=float(cmd.get("timeout", 30.0)))
    async with aiohttp.ClientSession(connector=conn, timeout=timeout, auto_decompress=False,
                                     headers={"Content-Type": "application/json"}) as session:
        sampler = asyncio.create_task(_sampler(window, cpu, cmd.get("cpu_pids", {}), start + warmup, run.stop_at))
        await asyncio.gather(*(_worker(run, session) for _ in range(conc)))
        await sampler
    return _summary(run, window, cpu)


async def _serve() -> None:
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            return
        try:
            out = await measure(json.loads(line))
        except Exception as e:  # answered, so the parent never hangs on a bad command
            out = {"fatal": repr(e)}
        sys.stdout.write(json.dumps(out) + "\n")
        sys.stdout.flush()


def main() -> int:
    import uvloop

    print("proxy load generator ready", flush=True)
    uvloop.run(_serve())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
