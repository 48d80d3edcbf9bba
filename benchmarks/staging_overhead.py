"""What host staging costs: one request's KV moved layer by layer over ``tcp``, with the
connector's staging (gather into a host slot, one write per layer, scatter on arrival) and
without it (one write per layer straight between the KV blocks), in the same run.

    python benchmarks/staging_overhead.py --geometry 8b --blocks 8,47,256 --rounds 15

Both transports live in this process (two ``TcpTransport``s over 127.0.0.1), so sender and
receiver share one interpreter: the figures compare the two paths, they are not the
transport's best. Block ids are scattered at random on both sides. ``ratio`` is staged
time / direct time (median of ``--rounds``); above 1 is the price of staging host KV
(``staging: always``), which a GPU KV cache pays in exchange for crossing a host-memory
transport at all.

``--device cuda`` adds a third column: the same request from a GPU KV cache (flash layout
``[2, blocks, block_size, heads, head_dim]``, the same bytes per block) over the same tcp
pair, staged as the connector stages it - CUDA gather kernel into a page-locked slot, one
write per layer, scatter kernel on arrival - and its ratio to the direct host-to-host move.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

from pdfabric.connector.links import ConsumerLink
from pdfabric.connector.staging import register_memory
from pdfabric.layout import KVLayout
from pdfabric.testing.staging import Side, move_request
from pdfabric.transports.tcp import TcpTransport

GEOMETRIES = {"tiny": ((2, 32, 128), 4), "8b": ((8, 16, 256), 8)}  # cpu layout (heads, block, 2*dim), layers
NUM_BLOCKS = 512


def one_request(s: TcpTransport, r: TcpTransport, sides: tuple[Side, Side], link: ConsumerLink, ids: tuple, k: int) -> float:
    t0 = time.perf_counter()
    move_request(s, r, link, sides[0], sides[1], ids, prefix=str(k))
    return time.perf_counter() - t0


def measure(geometry: str, mode: str, n: int, rounds: int, device: str = "cpu") -> float:
    inner, layers = GEOMETRIES[geometry]
    heads, block, two_dim = inner
    kind = "flash_nhd" if device == "cuda" else "cpu"
    shape = (2, NUM_BLOCKS, block, heads, two_dim // 2) if device == "cuda" else (NUM_BLOCKS, *inner)
    s, r = TcpTransport(), TcpTransport()
    try:
        src = {f"l{i}": torch.randn(shape, device=device).to(torch.bfloat16) for i in range(layers)}
        dst = {f"l{i}": torch.zeros(shape, dtype=torch.bfloat16, device=device) for i in range(layers)}
        pl = KVLayout.from_kv_caches(src, kind=kind, block_size=block)  # type: ignore[arg-type]
        cl = KVLayout.from_kv_caches(dst, kind=kind, block_size=block)  # type: ignore[arg-type]
        sides = (Side(pl, register_memory(s, pl, src, mode, 1 << 30)), Side(cl, register_memory(r, cl, dst, mode, 1 << 30)))
        link = ConsumerLink("bench", cl, s.connect(r.descriptor()))
        rng = random.Random(n)
        times = [one_request(s, r, sides, link, (rng.sample(range(NUM_BLOCKS), n), rng.sample(range(NUM_BLOCKS), n)), k)
                 for k in range(rounds + 2)]
        return statistics.median(times[2:])  # two warm-up rounds
    finally:
        s.close()
        r.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--geometry", choices=sorted(GEOMETRIES), default="8b")
    ap.add_argument("--blocks", default="8,47,256", help="blocks per request, comma separated (<= 512)")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--json", type=Path, metavar="FILE")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="cuda: also move the request from GPU KV through staging (third column)")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device (torch.cuda.is_available() is False)")
    counts = [int(x) for x in args.blocks.split(",")]
    if args.rounds < 3 or any(not 1 <= c <= NUM_BLOCKS for c in counts):
        ap.error(f"--rounds must be >= 3 and every --blocks value in 1..{NUM_BLOCKS}")
    inner, layers = GEOMETRIES[args.geometry]
    rows = []
    gpu = args.device == "cuda"
    print(f"{'blocks':>6} {'bytes':>10} {'direct ms':>10} {'staged ms':>10} {'ratio':>6}"
          + (f" {'GPU staged ms':>14} {'GPU ratio':>9}" if gpu else ""))
    for n in counts:
        direct, staged = measure(args.geometry, "auto", n, args.rounds), measure(args.geometry, "always", n, args.rounds)
        nbytes = n * layers * 2 * inner[0] * inner[1] * inner[2]
        row = {"blocks": n, "bytes": nbytes, "direct_s": direct, "staged_s": staged, "ratio": staged / direct}
        line = f"{n:>6} {nbytes:>10} {direct * 1e3:>10.2f} {staged * 1e3:>10.2f} {staged / direct:>6.2f}"
        if gpu:
            row["gpu_staged_s"] = g = measure(args.geometry, "auto", n, args.rounds, device="cuda")
            row["gpu_ratio"] = g / direct
            line += f" {g * 1e3:>14.2f} {g / direct:>9.2f}"
        rows.append(row)
        print(line)
    if args.json:
        args.json.write_text(json.dumps({"geometry": args.geometry, "results": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
