"""``pdfabric bench transfer``: the transfer-bandwidth benchmark (see pdfabric.bench.transfer)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

__all__ = ["register", "add_transfer_args", "run_transfer"]


def _sizes(text: str) -> list[int]:
    from pdfabric.units import parse_size

    try:
        return [parse_size(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_transfer_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--transport", default="tcp,shm", help="comma list of transports (default: tcp,shm)")
    p.add_argument("--size", type=_sizes, default="64MiB", help="bytes per transfer, comma list (default: 64MiB)")
    p.add_argument("--block-size", type=_sizes, default="64KiB,256KiB,2MiB", help="block sizes, comma list (default: 64KiB,256KiB,2MiB)")
    p.add_argument("--workload", choices=["blocks", "llama8b", "tiny"], default="blocks",
                   help="blocks: size/block-size scattered blocks; llama8b/tiny: all layers of a real KV geometry")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds per row (median reported; >= 3)")
    p.add_argument("--streams", type=int, default=None, help="tcp: parallel connections per peer")
    p.add_argument("--ucx-error-handling", choices=["peer", "none"], default=None,
                   help="ucx: UCX error handling (default peer; none: the same-host fast path)")
    p.add_argument("--peer", default="", metavar="NAMES",
                   help="peer tools to measure on the same plans (mooncake: Mooncake's transfer engine over TCP)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="where both ends' KV pools live; cuda: GPU memory (cupy), rows compared with a "
                        "device-to-device copy (d2d_copy); needed by cuda_ipc")  # fmt: skip
    p.add_argument("--latency-iters", type=int, default=200, help="4 KiB latency samples (0 to skip)")
    p.add_argument("--json", metavar="FILE", help="write every row as JSON")
    p.add_argument("--plot", metavar="FILE", help="write a PNG plot of GB/s vs block size (needs matplotlib)")


def register(sub: Any) -> None:
    bench = sub.add_parser("bench", help="benchmarks", description="Benchmarks with same-run baselines.")
    bsub = bench.add_subparsers(dest="bench_command", metavar="BENCH")
    p = bsub.add_parser("transfer", help="transfer bandwidth and latency per transport vs baselines")
    add_transfer_args(p)
    p.set_defaults(func=run_transfer)
    bench.set_defaults(func=lambda args: (bench.print_help(), 2)[1])


def _table(doc: dict[str, Any]) -> Any:
    from rich.table import Table

    from pdfabric.units import format_size

    gpu = doc["meta"].get("device", "cpu") != "cpu"
    on_gpu, ref = (", GPU memory", "ratio_to_d2d") if gpu else ("", "ratio_to_memcpy")
    t = Table(title=f"pdfabric transfer benchmark (median of {doc['meta']['rounds']} rounds{on_gpu})")
    for col in ("transport", "workload", "block", "total", "GB/s", "baseline", "base GB/s", "ratio", "ref ratio",
                "vs d2d" if gpu else "vs memcpy", "p50 us", "p99 us"):  # fmt: skip
        t.add_column(col, justify="left" if col in ("transport", "workload", "baseline") else "right")
    for r in doc["results"]:
        lat = r["workload"] == "latency"
        t.add_row(
            r["transport"], r["workload"], format_size(r["block_size"]), format_size(r["total_bytes"]),
            "-" if lat else f"{r['gbps']:.2f}", r["baseline"], "-" if lat else f"{r['baseline_gbps']:.2f}",
            f"{r['ratio']:.2f}" if not lat else f"{r['baseline_gbps'] / r['gbps']:.2f}x slower",
            "-" if lat or r.get("ratio_reference") is None else f"{r['ratio_reference']:.2f}",
            "-" if r.get(ref) is None else f"{r[ref]:.2f}",
            f"{r['p50_us']:.1f}", f"{r['p99_us']:.1f}",
        )  # fmt: skip
    return t


def _plot(doc: dict[str, Any], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("error: --plot needs matplotlib: pip install 'pdfabric[plot]'") from None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    rows = [r for r in doc["results"] if r["workload"] == "blocks"]
    for name in sorted({r["transport"] for r in rows}):
        pts = sorted((r["block_size"], r["gbps"]) for r in rows if r["transport"] == name)
        ax.plot([p[0] / 1024 for p in pts], [p[1] for p in pts], marker="o", label=name)
    for kind, by_size in doc["baselines"].items():
        for size, gbps in by_size.items():
            ax.axhline(gbps, linestyle="--", linewidth=1, label=f"{kind} ({size})", color="grey" if "socket" in kind else None)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("block size (KiB)")
    ax.set_ylabel("GB/s (median)")
    ax.set_title("pdfabric transfer bandwidth")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _cannot_run(names: list[str], device: str) -> str:
    """Why the named transports cannot be benchmarked here on ``device`` ("" when they can)."""
    from pdfabric.bench.transfer import DEVICE_ONLY
    from pdfabric.errors import TransportUnavailable
    from pdfabric.transports import transport_class

    for n in names:
        try:
            cls = transport_class(n)
        except TransportUnavailable as e:
            return f"--transport {n}: {e.message}"
        if device == "cuda" and not cls.capabilities.device_memory:
            return f"--transport {n}: it cannot move GPU memory (--device cuda); benchmark it with --device cpu"
        if device == "cpu" and n in DEVICE_ONLY:
            return f"--transport {n}: it moves GPU memory only; add --device cuda"
    if device == "cuda":
        from pdfabric.transports.cuda_ipc import unavailable_reason

        reason = unavailable_reason()  # cupy and a GPU, which the pools need
        if reason:
            return f"--device cuda: GPU memory needs cupy and a CUDA device: {reason}"
    return ""


def _bad_shape(sizes: list[int], blocks: list[int], args: argparse.Namespace) -> str:
    """What is wrong with the sizes, counts and output files asked for ("" when nothing):
    found before a run that may take minutes, not after it."""
    if not sizes or min(sizes) <= 0:
        return f"--size: expected sizes above 0, got {args.size if isinstance(args.size, str) else sizes}"
    if args.workload == "blocks":
        if not blocks or min(blocks) <= 0:
            return f"--block-size: expected sizes above 0, got {blocks}"
        if not any(b <= s for s in sizes for b in blocks):
            return (f"--size: every transfer ({', '.join(map(str, sizes))} bytes) is smaller than every block "
                    f"({', '.join(map(str, blocks))} bytes): no row to measure")
    if args.latency_iters < 0:
        return f"--latency-iters: expected 0 (skip) or more, got {args.latency_iters}"
    for flag, path in (("--json", args.json), ("--plot", args.plot)):
        if path:
            parent = os.path.dirname(os.path.abspath(path))
            if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
                return f"{flag}: cannot write {path}: {parent} is not a writable directory"
    return ""


def run_transfer(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import Progress

    from pdfabric.bench.transfer import run_benchmark
    from pdfabric.errors import FabricError
    from pdfabric.transports import TRANSPORTS

    names = [x.strip() for x in args.transport.split(",") if x.strip()]
    err = Console(stderr=True)
    for n in names:
        if n not in TRANSPORTS or n == "loopback":
            err.print(f"error: --transport: {n!r} is not a benchmarkable transport; expected some of "
                      f"{', '.join(sorted(set(TRANSPORTS) - {'loopback'}))}", markup=False)  # fmt: skip
            return 2
    why = _cannot_run(names, getattr(args, "device", "cpu"))
    if why:
        err.print(f"error: {why}", soft_wrap=True, markup=False)
        return 2
    if args.rounds < 3:
        err.print(f"error: --rounds: at least 3 rounds are needed for a median, got {args.rounds}")
        return 2
    if args.streams is not None and args.streams < 1:
        err.print(f"error: --streams: expected at least 1 connection, got {args.streams}")
        return 2
    sizes = args.size if isinstance(args.size, list) else _sizes(args.size)
    blocks = args.block_size if isinstance(args.block_size, list) else _sizes(args.block_size)
    why = _bad_shape(sizes, blocks, args)
    if why:
        err.print(f"error: {why}", soft_wrap=True, markup=False)
        return 2
    options: dict[str, dict[str, Any]] = {"tcp": {"streams": args.streams}} if args.streams is not None else {}
    if getattr(args, "ucx_error_handling", None):
        options["ucx"] = {"ucx_error_handling": args.ucx_error_handling}
    peers = [x.strip() for x in getattr(args, "peer", "").split(",") if x.strip()]
    bad = [x for x in peers if x != "mooncake"]
    if bad:
        err.print(f"error: --peer: {bad[0]!r} is not a known peer; expected mooncake", markup=False)
        return 2
    per_t = len(sizes) * (len(blocks) if args.workload == "blocks" else 1) * args.rounds + 1
    with Progress(console=err, transient=True) as prog:
        task = prog.add_task("transfer benchmark", total=per_t * len(names))
        try:
            doc = run_benchmark(names, sizes, blocks, args.rounds, workload=args.workload, options=options,
                                latency_iters=args.latency_iters, progress=lambda: prog.advance(task),
                                device=getattr(args, "device", "cpu"), peers=peers)  # fmt: skip
        except FabricError as e:
            err.print(f"error: {e}", markup=False, soft_wrap=True)
            return 1
    out = Console()
    out.width = max(out.width, 160)  # the table has twelve columns; do not squeeze them
    out.print(_table(doc))
    for name, why in (doc.get("skipped_peers") or {}).items():
        err.print(f"peer {name} skipped: {why}", markup=False, soft_wrap=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=2)
    if args.plot:
        _plot(doc, args.plot)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="transfer_bandwidth", description="pdfabric transfer-bandwidth benchmark")
    add_transfer_args(p)
    return run_transfer(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
