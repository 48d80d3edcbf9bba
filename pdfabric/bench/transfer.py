"""Transfer-bandwidth benchmark: pdfabric transports vs baselines measured in the same run.

Theory of operation
-------------------
The sender is this process, the receiver a child (``pdfabric.bench.child``). One round
moves ``size`` bytes as blocks of ``block_size`` from scattered source blocks into
scattered destination blocks (or, with ``--workload llama8b|tiny``, the blocks of a real
KV geometry across all layers, mapped by ``pdfabric.layout``). A round is timed from
``write`` to the receiver's acknowledgement, so it includes the whole push.

Baselines, measured in the same run on the same sizes:
- ``memcpy``: single-thread ``numpy.copyto`` of ``size`` contiguous bytes in-process;
- ``raw_socket``: a plain Python TCP socket, ``sendall`` of one contiguous buffer to a
  child that ``recv_into``s it and acks one byte;
- ``shm_copy``: one copy into a shared-memory segment the child mapped;
- ``raw_nixl``: the same scattered blocks written straight through ``nixl_agent`` to a
  child's agent (``pdfabric.bench.raw_nixl``; prepared lists, WRITE, poll to DONE);
- ``d2d_copy`` (``--device cuda``): one ``cudaMemcpyAsync`` of ``size`` contiguous bytes
  from GPU memory to GPU memory on the same device, synchronized - the bar for ``cuda_ipc``
  when the pools (ours and the child's) are GPU memory.
Ratios: ``nixl`` against ``raw_nixl`` (block workloads, host or GPU memory; also in
``ratio_to_raw_nixl``), other network transports against ``raw_socket``, same-host ones -
and ``ucx``, whose path to the child on this host is one cross-memory copy - against
``memcpy``; on GPU memory the rest against ``d2d_copy``. Every row also carries
``ratio_to_memcpy`` (``ratio_to_d2d`` on GPU memory), against that copy measured on its own
at the end.
Plans: the block workload's plans are ``RegionArray`` columns, the fast path a caller with
thousands of blocks per transfer takes (``TransferPlan.from_arrays``).
Each round grants, then writes, as the connector does; ``nixl`` rows count how many writes
went on the receiver's offer of the grant (``offers_used``) and how many asked first
(``asks``), so a row says which path it measured.
Peer rows (``run_benchmark(peers=["mooncake"])``): Mooncake's transfer engine over TCP
moves the same block plans from this process into a child (``bench.peers``), compared with
``raw_socket`` like the network transports; a peer that cannot load here has no row and
its reason in ``skipped_peers``.
Latency: one 4 KiB block, one-way (write -> receiver's ``wait_recv`` returns, on the shared
monotonic clock), against the raw socket's half round trip with 4 KiB each way.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import socket
import statistics
import time
from dataclasses import dataclass
from multiprocessing import shared_memory
from typing import Any, Callable, Sequence

import numpy as np

from pdfabric.bench.child import RAW_HDR, device_buffer
from pdfabric.memory import Region, RegionArray, region_of
from pdfabric.testing.peer import PeerProcess, decode_descriptor
from pdfabric.transports import PeerId, TransferId, TransferPlan, Transport, create
from pdfabric.units import format_size

__all__ = ["Row", "TransferBench", "WORKLOADS", "SAME_HOST", "DEVICE_ONLY", "run_benchmark"]

SAME_HOST = {"shm", "loopback", "cuda_ipc"}
DEVICE_ONLY = {"cuda_ipc"}  # moves GPU memory only: needs --device cuda
WORKLOADS = {
    # name: (layers, kv_heads, head_dim, block_size tokens, dtype bytes, layout kind)
    "llama8b": (32, 8, 128, 16, 2, "flash_nhd"),
    "tiny": (4, 2, 64, 32, 2, "cpu"),
}
_CHILD = "pdfabric.bench.child"


@dataclass
class Row:
    transport: str
    block_size: int
    total_bytes: int
    gbps: float
    baseline: str
    baseline_gbps: float
    ratio: float
    p50_us: float
    p99_us: float
    rounds: list[float] = dataclasses.field(default_factory=list)
    workload: str = "blocks"
    ack_half_rtt_p50_us: float | None = None  # latency rows: sender-side round trip / 2
    # gbps over the same baseline measured on its own at the end of the run (the stricter
    # of the two comparisons when the interleaved baseline was slowed by the machine)
    ratio_reference: float | None = None
    ratio_to_raw_nixl: float | None = None  # nixl rows: gbps over the interleaved raw NIXL
    ratio_to_memcpy: float | None = None  # gbps over single-thread memcpy (run's reference)
    ratio_to_d2d: float | None = None  # GPU runs: gbps over the device-to-device copy (run's reference)
    # nixl rows: writes (warm-up round included) posted on the receiver's offer / that asked first
    offers_used: int | None = None
    asks: int | None = None


def _pct(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    return float(np.percentile(np.asarray(values), q))


def _median_gbps(nbytes: int, seconds: Sequence[float]) -> float:
    return nbytes / statistics.median(seconds) / 1e9


class TransferBench:
    """Holds the processes and buffers of one benchmark run; ``close()`` stops them."""

    def __init__(
        self, rounds: int, progress: Callable[[], None] = lambda: None, seed: int = 0, device: str = "cpu"
    ) -> None:
        self.rounds = rounds
        self.device = device
        self._on = {"device": device} if device != "cpu" else {}  # child alloc requests
        self.progress = progress
        self.rng = np.random.default_rng(seed)
        self._children: list[PeerProcess] = []
        self._transports: list[Transport] = []
        self._keep: list[Any] = []
        self.ack_half_rtt: list[float] = []
        self.last_blocks: tuple[int, np.ndarray, np.ndarray] | None = None  # block, src ids, dst ids

    def close(self) -> None:
        for t in self._transports:
            t.close()
        for c in self._children:
            c.close()

    def _child(self, transport: str, options: dict[str, Any]) -> PeerProcess:
        c = PeerProcess(transport, options, module=_CHILD, timeout=120)
        self._children.append(c)
        return c

    # -- baselines (each an object whose round() is interleaved with the transport's) --
    def baseline(self, kind: str, size: int, echo: bool = False) -> "Baseline":
        cls = {"memcpy": Memcpy, "raw_socket": RawSocket, "shm_copy": ShmCopy, "raw_nixl": RawNixl, "d2d_copy": D2dCopy}[kind]
        return cls(self, size, echo)

    def buffer(self, size: int, fill: str = "random") -> Region:
        """A buffer of ours on the run's device, kept until the next ``pools``/``plan_kv``."""
        if self.device == "cpu":
            buf: Any = self.rng.integers(0, 256, size, dtype=np.uint8) if fill == "random" else np.ones(size, np.uint8)
            region = region_of(buf)
        else:
            buf, region = device_buffer(size, fill, int(self.rng.integers(1 << 20)))
        self._keep.append(buf)
        return region

    # -- transports ----------------------------------------------------------------------
    def open_transport(self, name: str, options: dict[str, Any]) -> tuple[Transport, PeerProcess, PeerId]:
        child = self._child(name, options)
        t = create(name, **options)
        self._transports.append(t)
        peer = t.connect(decode_descriptor(child.request("descriptor")["descriptor"]))
        return t, child, peer

    def pools(self, t: Transport, child: PeerProcess, size: int) -> tuple[int, int]:
        """A source pool here and a destination pool in the child, each twice ``size``;
        the previous pools are freed first."""
        self._keep = []
        child.request("free_all")
        pool = self.buffer(2 * size)
        t.register([pool])
        return pool.addr, child.request("alloc", size=2 * size, **self._on)["addr"]

    def plan_blocks(self, size: int, block: int, src_base: int, dst_base: int) -> tuple[list[Region], list[list[int]]]:
        """Scattered source blocks -> scattered destination blocks, both in 2x pools."""
        n = max(1, size // block)
        s_ids = self.rng.permutation(2 * n)[:n]
        d_ids = self.rng.permutation(2 * n)[:n]
        self.last_blocks = (block, s_ids, d_ids)
        src = [Region(src_base + int(i) * block, block) for i in s_ids]
        dsts = [[dst_base + int(j) * block, block] for j in d_ids]
        return src, dsts

    def plan_kv(
        self, t: Transport, child: PeerProcess, size: int, workload: str
    ) -> tuple[list[Region], list[list[int]], int]:
        """All layers of ``n`` scattered blocks of a real KV geometry (pdfabric.layout)."""
        from pdfabric.layout import KVGeometry, KVLayout, pair_regions

        layers, heads, hd, bs, esz, kind = WORKLOADS[workload]
        per_block = 2 * layers * heads * hd * bs * esz
        n = max(1, size // per_block)
        geo = KVGeometry(kind, layers, 2 * n, bs, heads, hd, "bfloat16", esz)  # type: ignore[arg-type]
        child.request("free_all")
        self._keep = []
        pools = [self.buffer(geo.layer_bytes) for _ in range(layers)]
        t.register(pools)
        src_layout = KVLayout.from_geometry(geo, [p.addr for p in pools])
        addrs = [child.request("alloc", size=geo.layer_bytes, **self._on)["addr"] for _ in range(layers)]
        dst_layout = KVLayout.from_geometry(geo, addrs)
        s_ids = self.rng.permutation(2 * n)[:n].tolist()
        d_ids = self.rng.permutation(2 * n)[:n].tolist()
        pairs = pair_regions(src_layout, s_ids, dst_layout, d_ids)
        return [p[0] for p in pairs], [[p[1].addr, p[1].length] for p in pairs], geo.segment_bytes

    def transfer_rounds(
        self, t: Transport, child: PeerProcess, peer: PeerId, src: list[Region], dst: list[list[int]], base: "Baseline"
    ) -> tuple[list[float], list[float]]:
        """Alternate one transfer round and one baseline round; (ours, baseline) seconds."""
        src_r = RegionArray.of(src)
        dst_r = RegionArray.of(Region(a, n) for a, n in dst)
        ours, theirs = [], []
        for i in range(self.rounds + 1):
            tid = f"bw-{id(src)}-{i}"
            child.request("grant", tid=tid, regions=dst)
            t0 = time.perf_counter()
            h = t.write(peer, TransferPlan(TransferId(tid), src_r, dst_r))
            t.wait(h, 120)
            dt = time.perf_counter() - t0
            child.request("wait_recv", tid=tid, timeout=30)
            b = base.round()
            if i:  # round 0 warms both up
                ours.append(dt)
                theirs.append(b)
                self.progress()
        return ours, theirs

    def latency(self, t: Transport, child: PeerProcess, peer: PeerId, iters: int) -> tuple[list[float], list[float]]:
        """One-way 4 KiB latency (write -> the receiver's wait_recv returning) and the raw
        socket's half round trip with 4 KiB each way, interleaved."""
        block = 4096
        self._keep = []
        buf = self.buffer(block, fill="ones")
        t.register([buf])
        dst = child.request("alloc", size=block, **self._on)["addr"]
        tids = [f"lat-{id(buf)}-{i}" for i in range(iters)]
        child.request("grant_many", tids=tids, regions=[[dst, block]])
        assert child.proc.stdin is not None
        child.proc.stdin.write(json.dumps({"op": "recv_times", "tids": tids}) + "\n")
        child.proc.stdin.flush()
        starts, theirs, acked = [], [], []
        with RawSocket(self, block, echo=True) as raw:
            for tid in tids:
                theirs.append(raw.round() / 2)
                t0 = time.perf_counter_ns()
                starts.append(t0)
                t.wait(t.write(peer, TransferPlan(TransferId(tid), (buf,), (Region(dst, block),))), 10)
                acked.append((time.perf_counter_ns() - t0) / 2e9)
        line = child.proc.stdout.readline() if child.proc.stdout else ""
        ends = json.loads(line)["times"]
        warm = iters // 10
        self.ack_half_rtt = acked[warm:]
        return [(e - s) / 1e9 for s, e in zip(starts, ends)][warm:], theirs[warm:]


def _row(transport: str, block: int, nbytes: int, seconds: list[float], base: str, base_s: list[float], workload: str) -> Row:
    gbps = _median_gbps(nbytes, seconds)
    bgbps = _median_gbps(nbytes, base_s)
    return Row(
        transport, block, nbytes, gbps, base, bgbps, gbps / bgbps,
        _pct(seconds, 50) * 1e6, _pct(seconds, 99) * 1e6, [nbytes / s / 1e9 for s in seconds], workload,
    )  # fmt: skip


def _reference_baselines(bench: TransferBench, sizes: Sequence[int], rounds: int) -> dict[str, dict[str, float]]:
    """The baselines on their own (not interleaved), GB/s by size: memcpy, raw_socket and
    shm_copy; with GPU pools, d2d_copy."""
    out: dict[str, dict[str, float]] = {}
    kinds = ("memcpy", "raw_socket", "shm_copy") if bench.device == "cpu" else ("d2d_copy",)
    for size in sizes:
        for kind in kinds:
            with bench.baseline(kind, size) as base:
                secs = [base.round() for _ in range(rounds + 1)][1:]
            out.setdefault(kind, {})[format_size(size)] = _median_gbps(size, secs)
    return out


def _baseline_kind(name: str, workload: str, device: str) -> str:
    """Which baseline a transport's rows are compared with."""
    if name == "nixl" and workload == "blocks":
        return "raw_nixl"
    if device != "cpu":
        return "d2d_copy"
    if name == "nixl":
        return "memcpy"
    if name == "ucx":  # the child is on this host: UCX moves blocks with one cross-memory copy
        return "memcpy"
    return "memcpy" if name in SAME_HOST else "raw_socket"


def _transport_rows(bench: TransferBench, name: str, options: dict[str, Any], sizes: Sequence[int],
                    blocks: Sequence[int], workload: str, latency_iters: int) -> list[Row]:  # fmt: skip
    """Every (size, block) row of one transport, then its 4 KiB latency row."""
    t, child, peer = bench.open_transport(name, options)
    kind = _baseline_kind(name, workload, bench.device)
    rows: list[Row] = []
    for size in sizes:
        if workload == "blocks":
            src_base, dst_base = bench.pools(t, child, size)
        for block in blocks if workload == "blocks" else [0]:
            if workload == "blocks" and block > size:
                continue  # a transfer smaller than one block is not a row
            if workload == "blocks":
                src, dst = bench.plan_blocks(size, block, src_base, dst_base)
            else:
                src, dst, block = bench.plan_kv(t, child, size, workload)
            nbytes = sum(r.length for r in src)
            before = dict(getattr(t, "stats", {}))
            with bench.baseline(kind, nbytes) as base:
                ours, theirs = bench.transfer_rounds(t, child, peer, src, dst, base)
            rows.append(_row(name, block, nbytes, ours, kind, theirs, workload))
            _count_approvals(rows[-1], before, t)
    if latency_iters:
        before = dict(getattr(t, "stats", {}))
        lat, raw = bench.latency(t, child, peer, latency_iters)
        row = _row(name, 4096, 4096, lat, "raw_socket_half_rtt", raw, "latency")
        row.ack_half_rtt_p50_us = _pct(bench.ack_half_rtt, 50) * 1e6  # write -> ACK, halved
        rows.append(row)
        _count_approvals(row, before, t)
    bench.progress()
    return rows


def _count_approvals(row: Row, before: dict[str, int], t: Transport) -> None:
    """nixl: how many of the row's writes went on the receiver's offer, how many asked."""
    if "offers_used" in before:
        stats = getattr(t, "stats", {})
        row.offers_used = stats["offers_used"] - before["offers_used"]
        row.asks = stats["asks"] - before["asks"]


def _add_reference_ratios(rows: list[Row], baselines: dict[str, dict[str, float]]) -> None:
    for r in rows:
        ref = baselines.get(r.baseline, {}).get(format_size(r.total_bytes))
        if ref:
            r.ratio_reference = r.gbps / ref
        mc = baselines.get("memcpy", {}).get(format_size(r.total_bytes))
        if mc and r.workload != "latency":
            r.ratio_to_memcpy = r.gbps / mc
        d2d = baselines.get("d2d_copy", {}).get(format_size(r.total_bytes))
        if d2d and r.workload != "latency":
            r.ratio_to_d2d = r.gbps / d2d
        if r.baseline == "raw_nixl":
            r.ratio_to_raw_nixl = r.ratio


def run_benchmark(
    transports: Sequence[str],
    sizes: Sequence[int],
    blocks: Sequence[int],
    rounds: int,
    *,
    workload: str = "blocks",
    options: dict[str, dict[str, Any]] | None = None,
    latency_iters: int = 200,
    progress: Callable[[], None] = lambda: None,
    device: str = "cpu",
    peers: Sequence[str] = (),
) -> dict[str, Any]:
    """Run every (transport, size, block) and the baselines; returns the JSON document.
    ``device="cuda"``: both ends' pools are GPU memory; rows are compared with d2d_copy (nixl
    with raw_nixl, and d2d_copy in ``ratio_to_d2d``)."""
    from pdfabric.bench.peers import peer_rows

    bench = TransferBench(rounds, progress, device=device)
    rows: list[Row] = []
    baselines: dict[str, dict[str, float]] = {}
    skipped: dict[str, str] = {}  # peer -> why it has no row
    try:
        for name in transports:
            rows += _transport_rows(bench, name, (options or {}).get(name, {}), sizes, blocks, workload, latency_iters)
        for name in peers:  # other projects' engines on the same block plans (peers.PEERS)
            why = peer_rows(bench, name, sizes, blocks, workload, rows)
            if why:
                skipped[name] = why
        baselines = _reference_baselines(bench, sizes, rounds)
    finally:
        bench.close()
    _add_reference_ratios(rows, baselines)
    return {
        "benchmark": "transfer_bandwidth",
        "meta": {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "python": platform.python_version(),
            "machine": platform.machine(),
            "rounds": rounds,
            "workload": workload,
            "device": device,
        },
        "baselines": baselines,
        "results": [dataclasses.asdict(r) for r in rows],
        "skipped_peers": skipped,
    }


class Baseline:
    """One baseline at one size; ``round()`` returns seconds for ``size`` bytes."""

    def __init__(self, bench: TransferBench, size: int, echo: bool = False) -> None:
        self.bench, self.size, self.echo = bench, size, echo

    def round(self) -> float:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> "Baseline":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Memcpy(Baseline):
    """Single-thread memcpy (numpy.copyto) of ``size`` contiguous bytes."""

    def __init__(self, bench: TransferBench, size: int, echo: bool = False) -> None:
        super().__init__(bench, size)
        self.src = bench.rng.integers(0, 256, size, dtype=np.uint8)
        self.dst = np.zeros_like(self.src)

    def round(self) -> float:
        t0 = time.perf_counter()
        np.copyto(self.dst, self.src)
        return time.perf_counter() - t0


class ShmCopy(Baseline):
    """One copy into a shared-memory segment that another process mapped."""

    def __init__(self, bench: TransferBench, size: int, echo: bool = False) -> None:
        from multiprocessing import resource_tracker

        super().__init__(bench, size)
        self.child = PeerProcess("loopback", {}, module=_CHILD, timeout=120)
        name = self.child.request("shm_create", size=size)["name"]
        self.shm = shared_memory.SharedMemory(name=name)
        resource_tracker.unregister(self.shm._name, "shared_memory")  # type: ignore[attr-defined]  # the child owns it
        self.view = np.ndarray(size, dtype=np.uint8, buffer=self.shm.buf)
        self.src = bench.rng.integers(0, 256, size, dtype=np.uint8)

    def round(self) -> float:
        t0 = time.perf_counter()
        np.copyto(self.view, self.src)
        return time.perf_counter() - t0

    def close(self) -> None:
        try:
            got = self.child.request("shm_sum", size=self.size)
            assert got["first"] == self.src[0] and got["last"] == self.src[-1], "shared-memory baseline lost data"
        finally:
            del self.view
            self.shm.close()
            self.child.request("close_extras")
            self.child.close()


class D2dCopy(Baseline):
    """One ``cudaMemcpyAsync`` of ``size`` contiguous bytes, GPU memory to GPU memory on the
    current device, on a stream of its own; timed to the stream's synchronize."""

    def __init__(self, bench: TransferBench, size: int, echo: bool = False) -> None:
        import cupy as cp

        super().__init__(bench, size)
        self.src, self.src_r = device_buffer(size, "random", 7)
        self.dst, self.dst_r = device_buffer(size)
        self.stream = cp.cuda.Stream(non_blocking=True)
        self._copy = cp.cuda.runtime.memcpyAsync
        self._kind = cp.cuda.runtime.memcpyDeviceToDevice

    def round(self) -> float:
        t0 = time.perf_counter()
        self._copy(self.dst_r.addr, self.src_r.addr, self.size, self._kind, self.stream.ptr)
        self.stream.synchronize()
        return time.perf_counter() - t0

    def close(self) -> None:
        self.stream.synchronize()
        self.src = self.dst = None


class RawNixl(Baseline):
    """The benchmark's last block plan, written straight through ``nixl_agent`` to a child."""

    def __init__(self, bench: TransferBench, size: int, echo: bool = False) -> None:
        from pdfabric.bench.raw_nixl import RawNixlSender

        super().__init__(bench, size)
        assert bench.last_blocks is not None, "raw_nixl needs a block plan (--workload blocks)"
        block, s_ids, d_ids = bench.last_blocks
        pool = 2 * len(s_ids) * block
        self.child = PeerProcess("loopback", {}, module=_CHILD, timeout=120)
        try:
            remote = self.child.request("raw_nixl_listen", size=pool, device=bench.device)
            self.sender = RawNixlSender(remote, pool, block, s_ids, d_ids, device=bench.device)
        except BaseException:
            self.child.close()
            raise

    def round(self) -> float:
        return self.sender.round()

    def close(self) -> None:
        try:
            self.sender.close()
        finally:
            self.child.request("close_extras")
            self.child.close()


class RawSocket(Baseline):
    """A plain Python TCP socket to a child: sendall ``size`` bytes, 1-byte ack (or echo)."""

    def __init__(self, bench: TransferBench, size: int, echo: bool = False) -> None:
        super().__init__(bench, size, echo)
        self.child = PeerProcess("loopback", {}, module=_CHILD, timeout=120)
        port = self.child.request("raw_listen", size=size)["port"]
        self.src = bench.rng.integers(0, 256, size, dtype=np.uint8)
        self.back = bytearray(size if echo else 1)
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def round(self) -> float:
        t0 = time.perf_counter()
        self.sock.sendall(RAW_HDR.pack(self.size, int(self.echo)))
        self.sock.sendall(self.src)
        self.sock.recv_into(self.back, len(self.back), socket.MSG_WAITALL)
        return time.perf_counter() - t0

    def close(self) -> None:
        self.sock.close()
        self.child.request("close_extras")
        self.child.close()
