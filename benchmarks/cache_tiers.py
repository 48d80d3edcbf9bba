"""Put/get throughput of each cache tier against a baseline measured in the same run.

Chunks are ``--chunk-tokens`` tokens of KV of a real geometry (default: the tiny Llama of
the tests, 4 layers, 2 KV heads, head dim 64, block 16; ``--geometry llama-8b`` for 32
layers, 8 KV heads, head dim 128) in each ``--dtype``. Baselines, same bytes, same batches:

    memory  numpy copyto into preallocated buffers (memcpy)
    disk    plain files in the same directory: open/write, open/readinto (one thread; the
            tier reads and writes a batch in --disk-read-threads lanes, default 2)
    redis   raw redis-py pipelines of SET / GET of the whole chunk
    s3      (no baseline: moto is a Python server, numbers show the tier works at all)

Every round runs baseline and tier back to back (the machine is shared and noisy);
the table shows medians over ``--rounds``. The script starts its own redis-server and
moto server on free ports and stops them by pid. E.g.::

    python benchmarks/cache_tiers.py --rounds 5 --json cache-tiers.json
    python benchmarks/cache_tiers.py --geometry llama-8b --dtype bfloat16 --tiers memory,disk,redis
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from pdfabric.cache import (
    DiskTier,
    GetOutcome,
    MemoryTier,
    PutOutcome,
    chunk_bytes_of,
    chunk_keys,
)
from pdfabric.cache.tier import CacheTier
from pdfabric.layout import KVGeometry
from pdfabric.testing.servers import MotoServer, RedisServer
from pdfabric.units import format_size, parse_size

GEOMETRIES = {
    "tiny": dict(num_layers=4, num_kv_heads=2, head_dim=64, block_size=16),
    "llama-8b": dict(num_layers=32, num_kv_heads=8, head_dim=128, block_size=16),
}
DTYPES = {"float32": 4, "bfloat16": 2}


@dataclass
class Row:
    geometry: str
    dtype: str
    chunk_bytes: int
    chunks: int
    target: str  # memory, memcpy, disk, file, redis, raw-redis, s3
    op: str  # put / get
    gbps: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.gbps)

    def as_dict(self) -> dict[str, Any]:
        return {
            "geometry": self.geometry, "dtype": self.dtype, "chunk_bytes": self.chunk_bytes,
            "chunks": self.chunks, "target": self.target, "op": self.op,
            "gbps_median": round(self.median, 3), "gbps_rounds": [round(x, 3) for x in self.gbps],
        }  # fmt: skip


def _timed(fn: Callable[[], None], nbytes: int) -> float:
    t0 = time.perf_counter()
    fn()
    return nbytes / (time.perf_counter() - t0) / 1e9


def _batches(n: int, size: int) -> list[slice]:
    return [slice(i, min(n, i + size)) for i in range(0, n, size)]


class Workload:
    def __init__(self, chunk_bytes: int, chunks: int, batch: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.chunk_bytes, self.chunks = chunk_bytes, chunks
        self.src = [rng.integers(0, 256, chunk_bytes, dtype=np.uint8) for _ in range(chunks)]
        self.dst = [np.zeros(chunk_bytes, dtype=np.uint8) for _ in range(chunks)]
        tokens = rng.integers(0, 32000, 256 * chunks).tolist()
        self.keys = chunk_keys(tokens, fingerprint=f"bench-{chunk_bytes}-{seed}")
        self.slices = _batches(chunks, batch)
        self.nbytes = chunk_bytes * chunks

    def clear_dst(self) -> None:
        for d in self.dst:
            d[:1] = 0

    def verify(self) -> None:
        for s, d in zip(self.src, self.dst):
            if not np.array_equal(s, d):
                raise SystemExit("benchmark read back different bytes")


# ---- one target per function: (clear, put, get) closures; put runs after clear() ----------

Ops = tuple[Callable[[], None], ...]


def tier_ops(tier: CacheTier, w: Workload) -> Ops:
    def clear() -> None:
        tier.delete(w.keys)

    def put() -> None:
        for s in w.slices:
            outs = tier.put(list(zip(w.keys[s], w.src[s])))
            if any(o is not PutOutcome.STORED for o in outs):
                raise SystemExit(f"{tier.name}: put answered {set(outs)}")

    def get() -> None:
        for s in w.slices:
            outs = tier.get_into(w.keys[s], w.dst[s])
            if any(o is not GetOutcome.HIT for o in outs):
                raise SystemExit(f"{tier.name}: get answered {set(outs)}")

    return clear, put, get


def memcpy_ops(w: Workload) -> Ops:
    slots = [np.zeros(w.chunk_bytes, dtype=np.uint8) for _ in range(w.chunks)]

    def put() -> None:
        for s, d in zip(w.src, slots):
            np.copyto(d, s)

    def get() -> None:
        for s, d in zip(slots, w.dst):
            np.copyto(d, s)

    return (lambda: None), put, get


def file_ops(root: str, w: Workload) -> Ops:
    paths = [os.path.join(root, f"plain-{i}.bin") for i in range(w.chunks)]

    def clear() -> None:
        for p in paths:
            if os.path.exists(p):
                os.unlink(p)

    def put() -> None:
        for p, s in zip(paths, w.src):
            with open(p, "wb") as f:
                f.write(memoryview(s))

    def get() -> None:
        for p, d in zip(paths, w.dst):
            with open(p, "rb", buffering=0) as f:
                f.readinto(memoryview(d))

    return clear, put, get


def raw_redis_ops(url: str, w: Workload) -> Ops:
    import redis

    client = redis.Redis.from_url(url)
    names = [b"raw:" + k.hex().encode() for k in w.keys]

    def clear() -> None:
        client.delete(*names)

    def put() -> None:
        for s in w.slices:
            with client.pipeline(transaction=False) as p:
                for n, v in zip(names[s], w.src[s]):
                    p.set(n, memoryview(v))
                p.execute()

    def get() -> None:
        for s in w.slices:
            with client.pipeline(transaction=False) as p:
                for n in names[s]:
                    p.get(n)
                vals = p.execute()
            for v, d in zip(vals, w.dst[s]):  # the bytes must land somewhere usable
                assert len(v) == len(d)

    return clear, put, get, client.close


# ---- driver ------------------------------------------------------------------------------------


def measure(name: str, ops: Ops, w: Workload, rounds: int, meta: tuple[str, str]) -> list[Row]:
    clear, put, get = ops[:3]
    puts, gets = [], []
    for r in range(rounds + 1):  # round 0 warms up page tables, sockets, the server
        clear()
        p = _timed(put, w.nbytes)
        w.clear_dst()
        g = _timed(get, w.nbytes)
        if r:
            puts.append(p)
            gets.append(g)
    clear()
    return [Row(meta[0], meta[1], w.chunk_bytes, w.chunks, name, "put", puts),
            Row(meta[0], meta[1], w.chunk_bytes, w.chunks, name, "get", gets)]  # fmt: skip


def interleaved(pairs: list[tuple[str, Ops]], w: Workload, rounds: int, meta: tuple[str, str]) -> list[Row]:
    """Baseline and tier one round each, alternately and in alternating order, so noise
    (and the page cache's write-back of the previous writer's bytes) hits both alike."""
    results: dict[str, tuple[list[float], list[float]]] = {n: ([], []) for n, _ in pairs}
    for r in range(rounds + 1):
        for name, ops in pairs if r % 2 else pairs[::-1]:
            clear, put, get = ops[:3]
            clear()
            p = _timed(put, w.nbytes)
            w.clear_dst()
            g = _timed(get, w.nbytes)
            if name not in ("memcpy", "file", "raw-redis"):
                w.verify()
            if r:
                results[name][0].append(p)
                results[name][1].append(g)
            clear()
    rows = []
    for name, (puts, gets) in results.items():
        rows.append(Row(meta[0], meta[1], w.chunk_bytes, w.chunks, name, "put", puts))
        rows.append(Row(meta[0], meta[1], w.chunk_bytes, w.chunks, name, "get", gets))
    return rows


def run_one(
    args: argparse.Namespace, dtype: str, work_dir: str, redis_url: str | None, s3_endpoint: str | None
) -> list[Row]:
    shape = GEOMETRIES[args.geometry]
    g = KVGeometry("cpu", num_blocks=1, dtype=dtype, element_size=DTYPES[dtype], **shape)  # type: ignore[arg-type]
    cb = chunk_bytes_of(g, args.chunk_tokens)
    chunks = max(4, args.total // cb)
    w = Workload(cb, chunks, args.batch, seed=DTYPES[dtype])
    meta = (args.geometry, dtype)
    tiers = set(args.tiers)
    rows: list[Row] = []
    if "memory" in tiers:
        with MemoryTier((chunks + 2) * cb, cb, high_watermark=1.0, low_watermark=0.9, prefault=True) as m:
            rows += interleaved([("memcpy", memcpy_ops(w)), ("memory", tier_ops(m, w))], w, args.rounds, meta)
    if "disk" in tiers:
        root = tempfile.mkdtemp(prefix="cache-bench-", dir=work_dir)
        try:
            with DiskTier(os.path.join(root, "tier"), 2 * chunks * cb, read_threads=args.disk_read_threads) as d:
                rows += interleaved([("file", file_ops(root, w)), ("disk", tier_ops(d, w))], w, args.rounds, meta)
        finally:
            shutil.rmtree(root, ignore_errors=True)
    if "redis" in tiers and redis_url:
        from pdfabric.cache.redis_tier import RedisTier

        raw = raw_redis_ops(redis_url, w)
        try:
            with RedisTier(redis_url, part_bytes=args.part_bytes, timeout_s=5.0) as rt:
                rows += interleaved([("raw-redis", raw), ("redis", tier_ops(rt, w))], w, args.rounds, meta)
        finally:
            raw[3]()
    if "s3" in tiers and s3_endpoint:
        rows += run_s3(args, w, s3_endpoint, meta)
    return rows


def run_s3(args: argparse.Namespace, w: Workload, endpoint: str, meta: tuple[str, str]) -> list[Row]:
    import boto3

    from pdfabric.cache.s3_tier import S3Tier

    creds = dict(region_name="us-east-1", aws_access_key_id="bench", aws_secret_access_key="bench")
    client = boto3.session.Session().client("s3", endpoint_url=endpoint, **creds)  # type: ignore[call-overload]
    try:
        client.create_bucket(Bucket="pdfabric-bench")
    finally:
        client.close()
    small = Workload(w.chunk_bytes, min(w.chunks, args.s3_chunks), args.batch, seed=7)
    with S3Tier("pdfabric-bench", endpoint=endpoint, region="us-east-1", access_key="bench",
                secret_key="bench", read_timeout_s=30.0) as s3:  # fmt: skip
        return measure("s3", tier_ops(s3, small), small, max(1, min(args.rounds, 3)), meta)


RATIOS = {
    "memory_get_vs_memcpy": ("memory", "memcpy", "get"),
    "memory_put_vs_memcpy": ("memory", "memcpy", "put"),
    "disk_vs_file": ("disk", "file", "get"),
    "disk_put_vs_file": ("disk", "file", "put"),
    "redis_vs_raw": ("redis", "raw-redis", "get"),
    "redis_put_vs_raw": ("redis", "raw-redis", "put"),
}


def paired_ratio(tier: Row, base: Row) -> float:
    """Median over rounds of tier / baseline of the same round: the two ran back to back
    (``interleaved``), so a noisy stretch of the shared machine hits both sides of a pair."""
    pairs = [t / b for t, b in zip(tier.gbps, base.gbps) if b]
    return statistics.median(pairs) if pairs else 0.0


def ratios(rows: list[Row]) -> dict[str, dict[str, float]]:
    """Per dtype: the paired ratio of each tier to its baseline."""
    out: dict[str, dict[str, float]] = {}
    by = {(r.dtype, r.target, r.op): r for r in rows}
    for dtype in sorted({r.dtype for r in rows}):
        for name, (tier, base, op) in RATIOS.items():
            if (dtype, tier, op) in by and (dtype, base, op) in by:
                out.setdefault(dtype, {})[name] = round(paired_ratio(by[(dtype, tier, op)], by[(dtype, base, op)]), 3)
    return out


def table(rows: list[Row]) -> str:
    base = {"memory": "memcpy", "disk": "file", "redis": "raw-redis"}
    by = {(r.dtype, r.target, r.op): r for r in rows}
    lines = [
        f"{'geometry':9} {'dtype':9} {'chunk':>8} {'n':>4} {'target':10} {'op':4} "
        f"{'GB/s':>7} {'min':>7} {'max':>7} {'vs base':>8}"
    ]
    for r in rows:
        ref = by.get((r.dtype, base.get(r.target, ""), r.op))
        ratio = f"{paired_ratio(r, ref):.2f}x" if ref else ""
        lines.append(
            f"{r.geometry:9} {r.dtype:9} {format_size(r.chunk_bytes):>8} {r.chunks:>4} {r.target:10} "
            f"{r.op:4} {r.median:7.2f} {min(r.gbps):7.2f} {max(r.gbps):7.2f} {ratio:>8}"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--geometry", choices=sorted(GEOMETRIES), default="tiny")
    p.add_argument("--dtype", default="float32,bfloat16", help="comma list of float32, bfloat16")
    p.add_argument("--chunk-tokens", type=int, default=256)
    p.add_argument("--total", type=parse_size, default=parse_size("128MiB"), help="bytes per round per target")
    p.add_argument("--batch", type=int, default=16, help="chunks per call")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--tiers", default="memory,disk,redis,s3")
    p.add_argument("--disk-read-threads", type=int, default=2, help="disk tier read_threads (1: no parallel lanes)")
    p.add_argument("--part-bytes", type=parse_size, default=parse_size("1MiB"), help="redis part size")
    p.add_argument("--s3-chunks", type=int, default=16, help="chunks per s3 round (moto is slow)")
    p.add_argument("--dir", default=None, help="where disk tier and plain files go (default: a temp dir)")
    p.add_argument("--json", default=None, help="write all rows and ratios here")
    args = p.parse_args(argv)
    args.tiers = [t for t in args.tiers.split(",") if t]
    args.dtypes = [d for d in args.dtype.split(",") if d]
    for d in args.dtypes:
        if d not in DTYPES:
            p.error(f"--dtype: expected float32 or bfloat16, got {d!r}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work_dir = args.dir or tempfile.gettempdir()
    redis_srv = RedisServer() if "redis" in args.tiers else None
    moto_srv = MotoServer() if "s3" in args.tiers else None
    rows: list[Row] = []
    try:
        if redis_srv:
            redis_srv.start()
        if moto_srv:
            moto_srv.start(timeout=60)
        for dtype in args.dtypes:
            rows += run_one(args, dtype, work_dir, redis_srv and redis_srv.url, moto_srv and moto_srv.endpoint)
    finally:
        for srv in (redis_srv, moto_srv):
            if srv is not None:
                srv.stop()
    print(table(rows))
    by_dtype = ratios(rows)
    for dtype, r in by_dtype.items():
        print(f"ratios {dtype}: " + ", ".join(f"{k}={v}" for k, v in r.items()))
    worst = {
        k: min(r[k] for r in by_dtype.values() if k in r)
        for k in RATIOS
        if any(k in r for r in by_dtype.values())
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": [r.as_dict() for r in rows], "ratios": worst,
                       "ratios_by_dtype": by_dtype}, f, indent=2)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
