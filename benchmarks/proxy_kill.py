"""Instance kills under load through the pdfabric proxy: no request lost or duplicated.

    python benchmarks/proxy_kill.py --duration 60 --concurrency 16 --json proxy-kill.json

Two prefill and two decode fake engines behind ``pdfabric proxy``; a prefill engine is
killed (SIGKILL) and restarted, then a decode engine, while the load runs. Every request is
counted on the client and in the engines' journals; see ``pdfabric.bench.proxy_kill``.
Exits 1 when a request was lost or duplicated.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pdfabric.bench.proxy_kill import format_kill_report, run_kill_test


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of load (default 60)")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--token-delay-ms", type=float, default=4.0, help="fake engines' time per output token")
    ap.add_argument("--json", type=Path, metavar="FILE", help="write the counts as JSON")
    args = ap.parse_args()
    if args.duration < 5 or args.concurrency < 1:
        ap.error("--duration must be >= 5 seconds and --concurrency >= 1")
    report = run_kill_test(duration=args.duration, concurrency=args.concurrency, delay_ms=args.token_delay_ms)
    print(format_kill_report(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
