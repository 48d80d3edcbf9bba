"""Bandwidth of the CUDA gather/scatter kernels against a device-to-device copy.

``python -m pdfabric.kernels --bench`` builds a KV cache per layout on the GPU, gathers
``--ids`` random distinct blocks of every layer, checks the bytes against the torch
backend, then times (median of ``--iters`` CUDA-event timings after warm-up, each call
queued behind a GPU-side wait so the events time the device's work) the gather
kernel, the scatter kernel, the torch backend's per-layer ``index_select``, and a plain
``copy_`` of the same number of bytes (the baseline, measured in the same run). Bandwidth
counts bytes read plus bytes written. The device's spec bandwidth (memory clock x bus
width) is printed beside it for reference. Exit status: 0 when every kernel reaches
``--min-ratio`` of the copy's bandwidth, 1 when one does not, 2 without a GPU or cupy.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["LAYOUTS", "BandwidthResult", "kernel_bandwidth", "layer_shape", "main"]

LAYOUTS = ("flash", "cpu", "mla")
MLA_LATENT_DIM = 576  # DeepSeek's kv_lora_rank 512 + rope dim 64
_GB = 1e9


@dataclass(frozen=True, slots=True)
class BandwidthResult:
    layout: str
    layer_shape: tuple[int, ...]
    dtype: str
    num_layers: int
    num_ids: int
    staging_bytes: int
    gather_gbps: float
    scatter_gbps: float
    torch_gather_gbps: float
    copy_gbps: float
    peak_gbps: float | None
    launch_us: float = 0.0  # host time to enqueue one gather call (not in the bandwidth)

    @property
    def gather_ratio(self) -> float:
        return self.gather_gbps / self.copy_gbps

    @property
    def scatter_ratio(self) -> float:
        return self.scatter_gbps / self.copy_gbps

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "gather_ratio": self.gather_ratio, "scatter_ratio": self.scatter_ratio}

    def line(self) -> str:
        def peak(gbps: float) -> str:
            return f", {gbps / self.peak_gbps:.2f}x spec" if self.peak_gbps else ""

        return (
            f"{self.layout:5} {list(self.layer_shape)} {self.dtype} x{self.num_layers} layers, "
            f"{self.num_ids} ids, {self.staging_bytes / 2**20:.0f} MiB staged: "
            f"gather {self.gather_gbps:.0f} GB/s ({self.gather_ratio:.2f}x copy{peak(self.gather_gbps)}), "
            f"scatter {self.scatter_gbps:.0f} GB/s ({self.scatter_ratio:.2f}x copy{peak(self.scatter_gbps)}), "
            f"torch index_select {self.torch_gather_gbps:.0f} GB/s, copy {self.copy_gbps:.0f} GB/s, "
            f"gather enqueued in {self.launch_us:.0f} us"
            + (f", spec {self.peak_gbps:.0f} GB/s" if self.peak_gbps else "")
        )


def layer_shape(layout: str, num_blocks: int, block_size: int, kv_heads: int, head_dim: int) -> tuple[int, ...]:
    """vLLM's per-layer shape: flash NHD, cpu, or mla (latent dim ``MLA_LATENT_DIM``)."""
    if layout == "flash":
        return (2, num_blocks, block_size, kv_heads, head_dim)
    if layout == "cpu":
        return (num_blocks, kv_heads, block_size, 2 * head_dim)
    if layout == "mla":
        return (num_blocks, block_size, MLA_LATENT_DIM)
    raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")


_HOLD_CYCLES = 4_000_000  # a GPU-side wait before each timed call: 2 ms at 2 GHz


def _median_ms(fn: Callable[[], object], iters: int, warmup: int = 3) -> tuple[float, float]:
    """(median device milliseconds of ``fn``'s work, median host microseconds to enqueue it).

    Before each timed call the stream is held by a spin kernel (``torch.cuda._sleep``), so
    the call's work is queued before the GPU reaches the start event: the events time the
    kernels, not the host's launch overhead (which varies with the machine's load and would
    otherwise count whenever the GPU finished faster than the host enqueued the next call).
    The enqueue time is reported on its own.
    """
    import time

    import torch

    for _ in range(warmup):
        fn()
    times, host = [], []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(_HOLD_CYCLES)
        start.record()
        t0 = time.perf_counter()
        fn()
        host.append(time.perf_counter() - t0)
        end.record()
        times.append((start, end))
        torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in times), 1e6 * statistics.median(host)


def _spec_gbps(device_index: int) -> float | None:
    """Memory clock x bus width x 2 (DDR), from the device attributes; None if unreadable."""
    try:
        import cupy

        clock_khz = cupy.cuda.runtime.deviceGetAttribute(36, device_index)  # MemoryClockRate
        bus_bits = cupy.cuda.runtime.deviceGetAttribute(37, device_index)  # GlobalMemoryBusWidth
    except Exception:  # noqa: BLE001 - reference figure only
        return None
    return 2 * clock_khz * 1e3 * bus_bits / 8 / _GB if clock_khz and bus_bits else None


def kernel_bandwidth(
    layout: str = "flash",
    *,
    num_layers: int = 32,
    num_blocks: int = 2048,
    num_ids: int = 1024,
    block_size: int = 16,
    kv_heads: int = 8,
    head_dim: int = 128,
    dtype: str = "bfloat16",
    iters: int = 20,
    seed: int = 0,
) -> BandwidthResult:
    """Measure one layout on the current CUDA device (see the module docstring)."""
    import torch

    from pdfabric.kernels.blocks import gather_blocks, scatter_blocks

    device = torch.device("cuda", torch.cuda.current_device())
    torch.manual_seed(seed)
    shape = layer_shape(layout, num_blocks, block_size, kv_heads, head_dim)
    layers = [torch.empty(shape, dtype=getattr(torch, dtype), device=device) for _ in range(num_layers)]
    for t in layers:
        t.view(torch.uint8).random_(0, 256)
    ids = torch.randperm(num_blocks)[:num_ids]
    staging = gather_blocks(layers, ids, backend="cuda")
    reference = gather_blocks(layers, ids, backend="torch")
    if not torch.equal(staging.view(torch.uint8), reference.view(torch.uint8)):
        raise RuntimeError(f"{layout}: the gather kernel's bytes differ from the torch backend's")
    copy_dst = torch.empty_like(staging)
    timed = {
        "gather": _median_ms(lambda: gather_blocks(layers, ids, staging, backend="cuda"), iters),
        "scatter": _median_ms(lambda: scatter_blocks(layers, ids, staging, backend="cuda"), iters),
        "torch": _median_ms(lambda: gather_blocks(layers, ids, reference, backend="torch"), iters),
        "copy": _median_ms(lambda: copy_dst.copy_(staging), iters),
    }
    ms = {k: v[0] for k, v in timed.items()}
    nbytes = staging.numel() * staging.element_size()
    gbps = {k: 2 * nbytes / (v * 1e-3) / _GB for k, v in ms.items()}
    return BandwidthResult(
        layout=layout,
        layer_shape=shape,
        dtype=dtype,
        num_layers=num_layers,
        num_ids=num_ids,
        staging_bytes=nbytes,
        gather_gbps=gbps["gather"],
        scatter_gbps=gbps["scatter"],
        torch_gather_gbps=gbps["torch"],
        copy_gbps=gbps["copy"],
        peak_gbps=_spec_gbps(device.index),
        launch_us=timed["gather"][1],
    )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pdfabric.kernels", description=__doc__.split("\n\n")[0])
    p.add_argument("--bench", action="store_true", help="measure the CUDA kernels (needs a GPU and cupy)")
    p.add_argument("--layouts", default=",".join(LAYOUTS), help="comma-separated, of %(default)s")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--blocks", type=int, default=2048, help="blocks per layer tensor")
    p.add_argument("--ids", type=int, default=1024, help="blocks gathered per call")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--min-ratio", type=float, default=0.7, help="least kernel/copy bandwidth that passes")
    p.add_argument("--json", metavar="PATH", help="also write the results here")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if not args.bench:
        _parser().print_help()
        return 2
    import torch

    from pdfabric.kernels import cuda

    if not torch.cuda.is_available() or not cuda.cupy_available():
        print("kernel bench: needs a CUDA device and cupy (pip install 'pdfabric[cuda]')", file=sys.stderr)
        return 2
    print(f"device: {torch.cuda.get_device_name()}", flush=True)
    results = []
    for layout in args.layouts.split(","):
        r = kernel_bandwidth(
            layout, num_layers=args.layers, num_blocks=args.blocks, num_ids=args.ids,
            dtype=args.dtype, iters=args.iters,
        )
        print(r.line(), flush=True)
        results.append(r)
        torch.cuda.empty_cache()
    failed = [
        f"{r.layout} {what} {ratio:.2f}x"
        for r in results
        for what, ratio in (("gather", r.gather_ratio), ("scatter", r.scatter_ratio))
        if ratio < args.min_ratio
    ]
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"min_ratio": args.min_ratio, "results": [r.as_dict() for r in results]}, f, indent=2)
    verdict = "FAIL below" if failed else "PASS: all at least"
    print(f"{verdict} {args.min_ratio}x of a device-to-device copy" + (f": {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0
