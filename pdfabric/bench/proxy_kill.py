"""Load through ``pdfabric proxy`` while engines are killed and restarted: every request counted.

Two prefill and two decode fake engines (``pdfabric.testing.fake_engine``, child processes that
journal every request as it ends) behind a ``pdfabric proxy`` child process. Workers send
completions and chat requests, streaming and not, each carrying a unique ``user`` id, for
``duration`` seconds. On a schedule, a prefill engine is killed (SIGKILL) and later restarted
on its port, then a decode engine the same way.

What is counted, per request id:

- the client side: ``ok`` (200 and a whole answer: every token, ``[DONE]`` for streams),
  ``error`` (an OpenAI-style error told to the client: an HTTP error body, or a stream that
  ends with an error event), ``lost`` (no answer in time, a dropped connection, a stream cut
  without an error event, a malformed or short answer);
- the engine side, from the journals (they survive SIGKILL): how many decode executions of
  the request *finished*. ``duplicated``: more than one; ``ok`` answers without exactly one.

The run passes when nothing is lost or duplicated, every ``ok`` was executed exactly once, every
request sent is accounted for, and both restarted engines served again. ``error`` answers can only
be streams that broke after bytes reached their client (the proxy retries everything else).
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from pdfabric.bench.proxy import Server, free_port

__all__ = ["run_kill_test", "format_kill_report"]

_PY = sys.executable
TOKENS = 12  # output tokens per answer


@dataclass
class _Engine:
    name: str
    role: str
    port: int
    journal: Path
    log: Path
    server: Server | None = None
    kills: list[float] = field(default_factory=list)
    restarts: list[float] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, delay_ms: float) -> None:
        argv = [_PY, "-m", "pdfabric.testing.fake_engine", "--port", str(self.port), "--role", self.role,
                "--name", self.name, "--tokens", str(TOKENS), "--delay-ms", str(delay_ms), "--no-record",
                "--journal", str(self.journal)]
        self.server = Server(self.name, argv, self.log)
        self.server.start()
        self.server.wait_line(r"fake engine .* on http", 30)

    def kill(self) -> None:
        assert self.server is not None and self.server.proc is not None
        os.kill(self.server.pid, signal.SIGKILL)
        self.server.proc.wait(10)

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()


@dataclass
class _Count:
    sent: int = 0
    outcome: dict[str, str] = field(default_factory=dict)  # request id -> ok / error / lost
    why: dict[str, str] = field(default_factory=dict)  # request id -> what went wrong
    stream: dict[str, bool] = field(default_factory=dict)


async def _one(session: aiohttp.ClientSession, url: str, rid: str, n: int, count: _Count, timeout: float) -> None:
    chat, stream = n % 4 >= 2, n % 2 == 1
    body: dict[str, Any] = {"model": "fake-model", "user": rid, "max_tokens": TOKENS, "stream": stream}
    prompt = f"request {rid}: " + "tell me about the sea. " * 20
    if chat:
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    path = "/v1/chat/completions" if chat else "/v1/completions"
    count.sent += 1
    count.stream[rid] = stream
    try:
        async with asyncio.timeout(timeout):
            async with session.post(url + path, json=body) as resp:
                raw = await resp.read()
        outcome, why = _judge(resp.status, raw, stream, chat)
    except (TimeoutError, aiohttp.ClientError, OSError) as e:
        outcome, why = "lost", f"no answer: {e!r}"
    count.outcome[rid] = outcome
    if why:
        count.why[rid] = why


def _judge(status: int, raw: bytes, stream: bool, chat: bool) -> tuple[str, str]:
    if status != 200:
        try:
            err = json.loads(raw)["error"]
            return "error", f"HTTP {status}: {err['message']}"
        except (ValueError, KeyError, TypeError):
            return "lost", f"HTTP {status} without an error body: {raw[:200]!r}"
    if not stream:
        try:
            choice = json.loads(raw)["choices"][0]
            text = choice["message"]["content"] if chat else choice["text"]
        except (ValueError, KeyError, IndexError, TypeError):
            return "lost", f"malformed answer: {raw[:200]!r}"
        return ("ok", "") if text.count(" tok") == TOKENS else ("lost", f"short answer: {text!r}")
    events = [line[6:] for line in raw.decode(errors="replace").splitlines() if line.startswith("data: ")]
    for e in events:
        if e != "[DONE]" and "error" in json.loads(e):
            return "error", "stream ended with an error event: " + json.loads(e)["error"]["message"]
    if not events or events[-1] != "[DONE]":
        return "lost", f"stream cut without an error event after {len(events)} events"
    if len(events) != TOKENS + 1:
        return "lost", f"stream of {len(events) - 1} tokens, expected {TOKENS}"
    return "ok", ""


async def _load(url: str, concurrency: int, duration: float, count: _Count, timeout: float) -> None:
    seq = iter(range(10**9))
    stop_at = time.monotonic() + duration
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn) as session:

        async def worker() -> None:
            while time.monotonic() < stop_at:
                n = next(seq)
                await _one(session, url, f"r{n}", n, count, timeout)

        await asyncio.gather(*(worker() for _ in range(concurrency)))


async def _faults(engines: dict[str, _Engine], schedule: list[tuple[float, str, str]], delay_ms: float) -> None:
    t0 = time.monotonic()
    for at, action, name in schedule:
        await asyncio.sleep(max(0.0, t0 + at - time.monotonic()))
        e = engines[name]
        if action == "kill":
            e.kills.append(time.time())
            await asyncio.to_thread(e.kill)
        else:
            await asyncio.to_thread(e.start, delay_ms)
            e.restarts.append(time.time())


def _journal(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:  # a line the kill cut short: it carried no finished execution
            continue
    return out


def run_kill_test(*, duration: float = 60.0, concurrency: int = 16, delay_ms: float = 4.0,
                  workdir: Path | None = None, timeout: float = 15.0) -> dict[str, Any]:
    """Run the load with the kill/restart schedule; returns the counts and the verdict."""
    tmp = tempfile.TemporaryDirectory(prefix="pdfabric-kill-") if workdir is None else None
    wd = Path(tmp.name) if tmp is not None else workdir
    assert wd is not None
    wd.mkdir(parents=True, exist_ok=True)
    engines = {n: _Engine(n, "prefill" if n[0] == "p" else "decode", free_port(), wd / f"{n}.jsonl", wd / f"{n}.log")
               for n in ("p0", "p1", "d0", "d1")}
    port = free_port()
    argv = [_PY, "-m", "pdfabric.cli", "proxy", "--port", str(port), "--health-interval", "0.5",
            "--leg-timeout", "10"]
    for e in engines.values():
        argv += ["--prefill", f"{e.url}@127.0.0.1:{e.port}"] if e.role == "prefill" else ["--decode", e.url]
    proxy = Server("pdfabric-proxy", argv, wd / "proxy.log")
    schedule = [(0.2 * duration, "kill", "p0"), (0.4 * duration, "restart", "p0"),
                (0.55 * duration, "kill", "d0"), (0.75 * duration, "restart", "d0")]
    count = _Count()
    try:
        for e in engines.values():
            e.start(delay_ms)
        proxy.start()
        proxy.url = f"http://127.0.0.1:{port}"
        proxy.wait_serving({"model": "fake-model", "prompt": "warm up", "max_tokens": 1}, 30)

        async def main() -> None:
            await asyncio.gather(_load(proxy.url, concurrency, duration, count, timeout),
                                 _faults(engines, schedule, delay_ms))

        t0 = time.monotonic()
        asyncio.run(main())
        took = time.monotonic() - t0
        metrics = _metrics(proxy.url)
    finally:
        for e in engines.values():
            e.stop()
        proxy.stop()
    report = _verdict(count, engines, metrics, took)
    report["config"] = {"duration_s": duration, "concurrency": concurrency, "token_delay_ms": delay_ms,
                        "tokens": TOKENS, "schedule": [{"at_s": a, "action": b, "engine": c} for a, b, c in schedule]}
    if tmp is not None:
        tmp.cleanup()
    return report


def _metrics(url: str) -> dict[str, float]:
    import urllib.request

    with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, _, value = line.partition(" ")
            out[name] = float(value)
    return out


def _verdict(count: _Count, engines: dict[str, _Engine], metrics: dict[str, float], took: float) -> dict[str, Any]:
    finished: collections.Counter[str] = collections.Counter()
    served_after: dict[str, int] = {}
    for e in engines.values():
        lines = _journal(e.journal)
        if e.restarts:
            served_after[e.name] = sum(1 for x in lines if x["at"] > e.restarts[-1] and x["outcome"] == "finished")
        if e.role != "decode":
            continue
        for x in lines:
            if x.get("user") and x["outcome"] == "finished":
                finished[x["user"]] += 1
    by = collections.Counter(count.outcome.values())
    duplicated = sorted(r for r, n in finished.items() if n > 1)
    ok_not_once = sorted(r for r, o in count.outcome.items() if o == "ok" and finished[r] != 1)
    errors_not_streams = sorted(r for r, o in count.outcome.items() if o == "error" and not count.stream[r])
    unanswered = count.sent - len(count.outcome)
    lost = sorted(r for r, o in count.outcome.items() if o == "lost")
    checks = {
        "nothing lost": not lost and unanswered == 0,
        "nothing duplicated": not duplicated,
        "every ok executed exactly once": not ok_not_once,
        "errors only on streams already answering": not errors_not_streams,
        "restarted engines served again": all(n > 0 for n in served_after.values()),
    }
    return {
        "sent": count.sent, "ok": by["ok"], "error": by["error"], "lost": len(lost), "unanswered": unanswered,
        "duplicated": len(duplicated), "ok_not_executed_once": len(ok_not_once),
        "seconds": round(took, 1), "served_after_restart": served_after,
        "proxy_metrics": {k: v for k, v in metrics.items() if k.startswith("pdfabric_proxy_") and "seconds" not in k},
        "examples": {"lost": [(r, count.why.get(r, "")) for r in lost[:5]], "duplicated": duplicated[:5],
                     "error": [(r, count.why.get(r, "")) for r, o in count.outcome.items() if o == "error"][:5]},
        "checks": checks, "passed": all(checks.values()),
    }


def format_kill_report(r: dict[str, Any]) -> str:
    cfg = r["config"]
    plan = ", ".join(f"{s['action']} {s['engine']} at {s['at_s']:.0f}s" for s in cfg["schedule"])
    m = r["proxy_metrics"]
    lines = [
        f"pdfabric proxy under instance kills: {cfg['duration_s']:.0f} s, concurrency {cfg['concurrency']}, {plan}",
        f"  requests sent {r['sent']}: ok {r['ok']}, error told to the client {r['error']}, lost {r['lost']}"
        f" (unanswered {r['unanswered']}), duplicated {r['duplicated']}",
        f"  proxy: prefill failures {m.get('pdfabric_proxy_prefill_failures_total', 0):.0f},"
        f" decode failures {m.get('pdfabric_proxy_decode_failures_total', 0):.0f},"
        f" streams broken {m.get('pdfabric_proxy_streams_broken_total', 0):.0f}",
        f"  served after restart: {r['served_after_restart']}",
    ]
    for name, ok in r["checks"].items():
        lines.append(f"  [{'ok' if ok else 'FAIL'}] {name}")
    for kind in ("lost", "error"):
        for rid, why in r["examples"][kind]:
            lines.append(f"    {kind} {rid}: {why}")
    lines.append("PASS" if r["passed"] else "FAIL")
    return "\n".join(lines)
