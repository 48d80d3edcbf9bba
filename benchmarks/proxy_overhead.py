"""The routing proxy's overhead against same-run baselines, in front of instant fake engines:
``direct`` (no proxy), ``pdfabric`` (``pdfabric proxy``), ``toy`` (a sequential FastAPI +
httpx proxy like vLLM's toy_proxy_server), ``vllm-router`` and ``sglang-router`` (Rust, PD
modes). See ``pdfabric.bench.proxy`` for what each column measures.

    python benchmarks/proxy_overhead.py --rows direct,pdfabric,toy,vllm-router,sglang-router \
        --concurrency 1,64 --duration 10 --rounds 3 --json proxy.json

The Rust routers come from PyPI: ``.venv/bin/pip install vllm-router sglang-router``; a row
whose package is missing (or that cannot start) is skipped with the reason.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

from pdfabric.bench.proxy import ROWS, format_report, run_benchmark


def _rows(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    bad = [n for n in names if n not in ROWS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown row(s) {bad}; choose from {','.join(ROWS)}")
    if "direct" not in names:
        names.insert(0, "direct")  # the floor that added latency is measured against
    return names


def _ints(text: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of integers, got {text!r}") from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError("concurrency values must be >= 1")
    return out


def _positive(text: str) -> float:
    v = float(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return v


def _stop(signum: int, _: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=_rows, default=list(ROWS), help=f"comma list of {','.join(ROWS)}")
    ap.add_argument("--duration", type=_positive, default=10.0, help="measured seconds per point and round")
    ap.add_argument("--rounds", type=int, default=3, help="rounds (medians reported)")
    ap.add_argument("--concurrency", type=_ints, default=[1, 64], help="comma list, e.g. 1,64")
    ap.add_argument("--max-tokens", type=int, default=8, help="output tokens per request (stream chunks)")
    ap.add_argument("--warmup", type=float, default=None, help="seconds before each window (default: duration/10, "
                                                                "0.2..1)")
    ap.add_argument("--log-dir", type=Path, default=None, help="keep the servers' logs here")
    ap.add_argument("--max-other-pct", type=float, default=25.0,
                    help="measure a point again when other processes used more than this %% of a core during it")
    ap.add_argument("--json", type=Path, default=None, metavar="FILE", help="write every row, ratios and targets")
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.max_tokens < 1:
        ap.error("--rounds and --max-tokens must be >= 1")
    # SIGTERM (and SIGINT, even where a background shell ignores it) stop the run through its
    # clean-up: every child process it started is stopped
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _stop)
    report = run_benchmark(args.rows, duration=args.duration, rounds=args.rounds, concurrency=args.concurrency,
                           tokens=args.max_tokens, warmup=args.warmup, log_dir=args.log_dir,
                           max_other_pct=args.max_other_pct)
    print(format_report(report))
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    bad = [r["row"] for r in report["rows"] if not r["valid"]]
    if bad:
        print(f"\ninvalid rows (errors or non-200 answers): {sorted(set(bad))}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
