"""The proxy benchmark's report: medians over rounds, added latency against ``direct``, the
ratios and targets, and the text tables (one per point: streaming or not x concurrency)."""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Sequence
from typing import Any

__all__ = ["summarize", "format_report", "TARGETS"]

RUST = ("vllm-router", "sglang-router")
# pdfabric's targets: added p50 at c=1 (streaming and not), and non-streaming c=64 throughput
TARGETS = {"added_p50_ms_max": 1.0, "vs_toy_min": 3.0, "vs_best_rust_min": 0.8}

Samples = dict[tuple[str, bool, int], list[dict[str, Any]]]


def _median(values: Sequence[float]) -> float | None:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return float(statistics.median(vals)) if vals else None


def _num(x: float | None, digits: int = 4) -> float | None:
    return None if x is None or math.isnan(x) else round(x, digits)


def _row(row: str, stream: bool, c: int, res: list[dict[str, Any]]) -> dict[str, Any]:
    def med(key: str) -> float | None:
        return _num(_median([r[key] for r in res]))

    def pct(group: str) -> float | None:
        return _num(_median([r["cpu_pct"].get(group, math.nan) for r in res]), 1)

    cpu = [r["cpu_s"]["proxy"] / r["requests"] * 1e6 for r in res if r["requests"]] if row != "direct" else []
    errors, non200 = sum(r["errors"] for r in res), sum(r["non200"] for r in res)
    requests = sum(r["requests"] for r in res)
    return {
        "row": row, "stream": stream, "concurrency": c,
        "rps": _num(_median([r["rps"] for r in res]), 1), "p50_ms": med("p50_ms"), "p99_ms": med("p99_ms"),
        "mean_ms": med("mean_ms"), "ttfb_p50_ms": med("ttfb_p50_ms"),
        "cpu_us_per_req": _num(_median(cpu), 1) if cpu else None,
        "proxy_cpu_pct": pct("proxy") if row != "direct" else None,
        "engines_cpu_pct": pct("engines"), "loadgen_cpu_pct": pct("loadgen"), "other_cpu_pct": pct("other"),
        "requests": requests, "errors": errors, "non200": non200,
        "disturbed": sum(r.get("disturbed", 0) for r in res),
        "first_error": next((r["first_error"] for r in res if r["first_error"]), ""),
        "valid": errors == 0 and non200 == 0 and requests > 0,
        "rounds": [{"rps": _num(r["rps"], 1), "p50_ms": _num(r["p50_ms"]), "p99_ms": _num(r["p99_ms"])} for r in res],
    }


def _find(rows: list[dict[str, Any]], row: str, stream: bool, c: int) -> dict[str, Any] | None:
    for r in rows:
        if (r["row"], r["stream"], r["concurrency"]) == (row, stream, c) and r["valid"]:
            return r
    return None


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def _added(rows: list[dict[str, Any]]) -> None:
    for r in rows:
        base = _find(rows, "direct", r["stream"], r["concurrency"])
        ours = _find(rows, "pdfabric", r["stream"], r["concurrency"])
        for q in ("p50", "p99"):
            mine, floor = r[f"{q}_ms"], base[f"{q}_ms"] if base else None
            r[f"added_{q}_ms"] = _num(mine - floor) if mine is not None and floor is not None else None
        r["pdfabric_x"] = _ratio(ours["rps"], r["rps"]) if ours and r["valid"] else None


def _ratios(rows: list[dict[str, Any]]) -> dict[str, Any]:
    ours, toy = _find(rows, "pdfabric", False, 64), _find(rows, "toy", False, 64)
    rust = [r for r in (_find(rows, n, False, 64) for n in RUST) if r is not None]
    best = max(rust, key=lambda r: r["rps"] or 0.0) if rust else None
    rps = ours["rps"] if ours else None
    return {"vs_toy_c64": _ratio(rps, toy["rps"] if toy else None),
            "vs_best_rust_c64": _ratio(rps, best["rps"] if best else None),
            "best_rust": best["row"] if best else None}


def _targets(rows: list[dict[str, Any]], ratios: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for stream in (True, False):
        r = _find(rows, "pdfabric", stream, 1)
        v = r["added_p50_ms"] if r else None
        out[f"added_p50_c1_{'stream' if stream else 'plain'}"] = {
            "value_ms": v, "max_ms": TARGETS["added_p50_ms_max"],
            "pass": None if v is None else v <= TARGETS["added_p50_ms_max"]}
    for key, limit in (("vs_toy_c64", TARGETS["vs_toy_min"]), ("vs_best_rust_c64", TARGETS["vs_best_rust_min"])):
        v = ratios[key]
        out[key] = {"value": v, "min": limit, "pass": None if v is None else v >= limit}
    return out


def summarize(samples: Samples, config: dict[str, Any], skipped: dict[str, str],
              notes: dict[str, str]) -> dict[str, Any]:
    order = {name: i for i, name in enumerate(config["rows"])}
    keys = sorted(samples, key=lambda k: (k[1], k[2], order.get(k[0], 99)))
    rows = [_row(row, stream, c, samples[(row, stream, c)]) for row, stream, c in keys]
    _added(rows)
    ratios = _ratios(rows)
    return {"config": config, "rows": rows, "skipped": skipped, "notes": notes, "ratios": ratios,
            "targets": _targets(rows, ratios)}


def _f(x: float | None, fmt: str) -> str:
    width = re.match(r"[+]?(\d*)", fmt).group(1)  # type: ignore[union-attr]
    return format("-", f">{width}") if x is None else format(x, fmt)


_HEAD = (f"{'row':14} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'+p50 ms':>8} {'+p99 ms':>8} "
         f"{'CPU us/req':>10} {'proxy %':>7} {'lg %':>5} {'eng %':>5} {'oth %':>5} {'pdf x':>6} {'err':>5}")


def _line(r: dict[str, Any]) -> str:
    err = r["errors"] + r["non200"]
    return (f"{r['row']:14} {_f(r['rps'], '8.0f')} {_f(r['p50_ms'], '7.3f')} {_f(r['p99_ms'], '7.3f')} "
            f"{_f(r['added_p50_ms'], '+8.3f')} {_f(r['added_p99_ms'], '+8.3f')} {_f(r['cpu_us_per_req'], '10.0f')} "
            f"{_f(r['proxy_cpu_pct'], '7.0f')} {_f(r['loadgen_cpu_pct'], '5.0f')} {_f(r['engines_cpu_pct'], '5.0f')} "
            f"{_f(r['other_cpu_pct'], '5.0f')} "
            f"{_f(r['pdfabric_x'], '6.2f')} {err:5d}" + ("" if r["valid"] else f"  INVALID: {r['first_error']}"))


def _verdict(t: dict[str, Any]) -> str:
    return {True: "PASS", False: "FAIL", None: "not measured"}[t["pass"]]


def format_report(report: dict[str, Any]) -> str:
    cfg = report["config"]
    out = [f"proxy overhead: {cfg['duration_s']:g} s x {cfg['rounds']} round(s) per point (medians), "
           f"warm-up {cfg['warmup_s']:g} s, max_tokens {cfg['max_tokens']}, {cfg['cpus']} CPUs; "
           "+p50/+p99: over direct; proxy/lg/eng/oth %: CPU of the server, load generator, fakes, and of other "
           "processes on the machine (100 = one core; oth % well above 0: a disturbed measurement); "
           "pdf x: pdfabric req/s over the row's"]
    points = sorted({(r["stream"], r["concurrency"]) for r in report["rows"]})
    for stream, c in points:
        out += ["", f"{'streaming' if stream else 'non-streaming'}, concurrency {c}", _HEAD]
        out += [_line(r) for r in report["rows"] if (r["stream"], r["concurrency"]) == (stream, c)]
    for row, why in report["skipped"].items():
        out.append(f"\nskipped {row}: {why}")
    if report["notes"]:
        out.append("")
        out += [f"note {row}: {text}" for row, text in report["notes"].items() if row not in report["skipped"]]
    t = report["targets"]
    out += ["", "targets (pdfabric):"]
    for name, label in (("added_p50_c1_stream", "added p50, c=1, streaming"),
                        ("added_p50_c1_plain", "added p50, c=1, non-streaming")):
        out.append(f"  {label:50} {_f(t[name]['value_ms'], '.3f'):>7} ms  (<= {t[name]['max_ms']:g})  "
                   f"{_verdict(t[name])}")
    best = report["ratios"]["best_rust"] or "the faster Rust router"
    for name, label in (("vs_toy_c64", "req/s over toy, c=64 non-streaming"),
                        ("vs_best_rust_c64", f"req/s over {best}, c=64 non-streaming")):
        out.append(f"  {label:50} {_f(t[name]['value'], '.2f'):>7} x   (>= {t[name]['min']:g})  {_verdict(t[name])}")
    return "\n".join(out)
