"""Samples, rows and the table of the end-to-end TTFT benchmark (``pdfabric.bench.ttft``).

p50/p99 are taken per round over the prompt set, then the median over rounds; times in
the table are milliseconds.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Row", "Sample", "SetupRun", "format_table", "summarize"]


@dataclass
class Sample:
    round: int
    prompt_tokens: int
    index: int
    ttft: float
    e2e: float
    p_leg: float | None
    d_leg: float
    d_wait: float | None
    d_first: float | None
    kv_tokens: float | None
    local_tokens: float | None
    text: str


@dataclass
class Row:
    setup: str
    prompt_tokens: int
    mode: str
    ttft_p50: float | None = None
    ttft_p99: float | None = None
    e2e_p50: float | None = None
    e2e_p99: float | None = None
    p_leg_p50: float | None = None
    d_leg_p50: float | None = None
    d_wait_p50: float | None = None
    d_first_p50: float | None = None
    kv_per_req: float | None = None
    local_per_req: float | None = None
    vs_tcp: float | None = None
    vs_single: float | None = None
    check: str = "unchecked"
    error: str | None = None
    notes: list[str] = field(default_factory=list)
    round_ttft_p50: list[float] = field(default_factory=list)


@dataclass
class SetupRun:
    name: str
    mode: str
    samples: list[Sample] = field(default_factory=list)
    verified: dict[int, list[tuple[list[int], str]]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0


# -- statistics ------------------------------------------------------------------------


def _pct(values: Sequence[float], q: float) -> float:
    xs = sorted(values)
    k = (len(xs) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def _per_round(samples: Sequence[Sample], attr: str, q: float) -> float | None:
    """``q``-th percentile over the prompt set in each round, median over rounds."""
    rounds: dict[int, list[float]] = {}
    for s in samples:
        v = getattr(s, attr)
        if v is not None:
            rounds.setdefault(s.round, []).append(v)
    if not rounds:
        return None
    return statistics.median(_pct(v, q) for v in rounds.values())


def _check(run: SetupRun, n: int, samples: list[Sample], ref: SetupRun | None) -> str:
    problems = []
    if ref is None or n not in ref.verified:
        return "no single ref"
    want = ref.verified[n]
    got = run.verified.get(n, [])
    bad = sum(1 for (g, _), (w, _) in zip(got, want) if g != w) + abs(len(got) - len(want))
    if bad:
        problems.append(f"TOKENS DIFFER {bad}/{len(want)}")
    bad_text = sum(1 for s in samples if s.text != want[s.index][1])
    if bad_text:
        problems.append(f"STREAM TEXT DIFFERS {bad_text}/{len(samples)}")
    if run.mode != "single":
        no_kv = sum(1 for s in samples if not s.kv_tokens)
        if no_kv:
            problems.append(f"NO KV {no_kv}/{len(samples)}")
    return "; ".join(problems) or "ok"


def summarize(runs: Sequence[SetupRun], lengths: Sequence[int]) -> list[Row]:
    ref = next((r for r in runs if r.name == "single" and not r.error), None)
    rows: list[Row] = []
    for run in runs:
        for n in lengths:
            row = Row(run.name, n, run.mode, error=run.error, notes=list(run.notes))
            if run.error:
                row.check = "FAILED (see error)"
            samples = [s for s in run.samples if s.prompt_tokens == n]
            if samples:
                for attr in ("ttft", "e2e"):
                    setattr(row, f"{attr}_p50", _per_round(samples, attr, 50))
                    setattr(row, f"{attr}_p99", _per_round(samples, attr, 99))
                for attr in ("p_leg", "d_leg", "d_wait", "d_first"):
                    setattr(row, f"{attr}_p50", _per_round(samples, attr, 50))
                kv = [s.kv_tokens for s in samples if s.kv_tokens is not None]
                loc = [s.local_tokens for s in samples if s.local_tokens is not None]
                row.kv_per_req = statistics.fmean(kv) if kv else None
                row.local_per_req = statistics.fmean(loc) if loc else None
                row.round_ttft_p50 = [_pct([s.ttft for s in samples if s.round == r], 50)
                                      for r in sorted({s.round for s in samples})]
                row.check = _check(run, n, samples, ref)
            rows.append(row)
    for n in lengths:
        base = {r.setup: r.ttft_p50 for r in rows if r.prompt_tokens == n and r.ttft_p50}
        for r in rows:
            if r.prompt_tokens == n and r.ttft_p50:
                r.vs_tcp = r.ttft_p50 / base["pdfabric-tcp"] if "pdfabric-tcp" in base else None
                r.vs_single = r.ttft_p50 / base["single"] if "single" in base else None
    return rows


_COLS = [("setup", "setup", 13), ("prompt", "prompt_tokens", 6), ("TTFT p50", "ttft_p50", 9),
         ("TTFT p99", "ttft_p99", 9), ("E2E p50", "e2e_p50", 8), ("E2E p99", "e2e_p99", 8),
         ("P leg", "p_leg_p50", 7), ("D leg", "d_leg_p50", 7), ("D wait", "d_wait_p50", 7),
         ("D 1st", "d_first_p50", 7), ("kv/req", "kv_per_req", 6), ("local/req", "local_per_req", 9),
         ("vs tcp", "vs_tcp", 6), ("vs single", "vs_single", 9), ("check", "check", 5)]
_MS = {"ttft_p50", "ttft_p99", "e2e_p50", "e2e_p99", "p_leg_p50", "d_leg_p50", "d_wait_p50", "d_first_p50"}


def _cell(attr: str, v: Any) -> str:
    if v is None:
        return "-"
    if attr in _MS:
        return f"{v * 1e3:.1f}"
    if attr in ("vs_tcp", "vs_single"):
        return f"{v:.2f}"
    if attr in ("kv_per_req", "local_per_req"):
        return f"{v:.0f}"
    return str(v)


def format_table(rows: Sequence[Row], markdown: bool = False) -> str:
    """Times in ms (p50/p99: per round over the prompt set, median over rounds)."""
    head = [c[0] for c in _COLS]
    body = [[_cell(a, getattr(r, a)) for _h, a, _w in _COLS] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join(lines + ["| " + " | ".join(b) + " |" for b in body])
    widths = [max(w, len(h), *(len(b[i]) for b in body)) for i, (h, _a, w) in enumerate(_COLS)]

    def fmt(cells: list[str]) -> str:  # text columns left-aligned, numbers right-aligned
        return "  ".join(c.ljust(w) if i in (0, len(cells) - 1) else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([fmt(head)] + [fmt(b) for b in body])
