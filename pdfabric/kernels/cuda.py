"""The CUDA backend: ``csrc/kv_gather_scatter.cu`` built at run time with ``cupy.RawModule``.

The source is read from ``pdfabric/csrc/`` (where a wheel installs it) or the repository's
``csrc/`` (a checkout or editable install), compiled by NVRTC with ``NVRTC_OPTIONS`` once
per device and process (cupy also keeps the binary in its on-disk kernel cache), and
launched on torch's current stream of the layers' device. Launch arithmetic lives in
``launch_config``, which needs no GPU, so tests can check it against the kernel source.
Ids and the layer base addresses travel in one small pinned host-to-device copy per call.
"""

from __future__ import annotations

import functools
import importlib.util
import re
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pdfabric.errors import TransportUnavailable

if TYPE_CHECKING:
    import torch

    from pdfabric.kernels.blocks import BlockGeometry

__all__ = [
    "NVRTC_OPTIONS",
    "SOURCE_NAME",
    "LaunchConfig",
    "cupy_available",
    "launch",
    "launch_config",
    "source_path",
    "source_text",
]

SOURCE_NAME = "kv_gather_scatter.cu"
# NVRTC options; nvcc takes them too (the unit tests compile with them)
NVRTC_OPTIONS: tuple[str, ...] = ("-std=c++17",)
_CTAS_PER_SM = 8  # a grid of one full wave of 256-thread CTAs; the kernel strides over the rest

_lock = threading.Lock()
_functions: dict[int, tuple[Any, Any]] = {}  # device index -> (kv_gather, kv_scatter)


def source_path(name: str = SOURCE_NAME) -> Path:
    """Where a ``csrc/`` kernel source is: installed package data first, then the repository."""
    package = Path(__file__).resolve().parent.parent
    candidates = (package / "csrc" / name, package.parent / "csrc" / name)
    for path in candidates:
        if path.is_file():
            return path
    raise TransportUnavailable(
        f"CUDA kernel source {name} not found (looked at {', '.join(map(str, candidates))}); "
        "reinstall pdfabric so that its csrc/ files are installed"
    )


@functools.cache
def source_text(name: str = SOURCE_NAME) -> str:
    return source_path(name).read_text(encoding="utf-8")


@functools.cache
def _define(name: str) -> int:
    m = re.search(rf"^#define {name} (\d+)$", source_text(), re.MULTILINE)
    if m is None:
        raise TransportUnavailable(f"{SOURCE_NAME}: no '#define {name} <int>' line")
    return int(m.group(1))


@functools.cache
def cupy_available() -> bool:
    return importlib.util.find_spec("cupy") is not None


@dataclass(frozen=True, slots=True)
class LaunchConfig:
    """One launch: ``grid`` CTAs of ``block`` threads stride over ``n_work`` chunks."""

    grid: int
    block: int
    chunk_bytes: int
    n_work: int


def launch_config(geom: BlockGeometry, num_ids: int, sm_count: int) -> LaunchConfig:
    """Launch shape for ``num_ids`` ids; chunk size from the source's KV_THREADS/KV_UNROLL."""
    threads = _define("KV_THREADS")
    chunk = threads * 16 * _define("KV_UNROLL")
    chunks = -(-geom.inner_bytes // chunk)
    n_work = geom.num_layers * geom.outer * num_ids * chunks
    grid = max(1, min(n_work, sm_count * _CTAS_PER_SM))
    return LaunchConfig(grid=grid, block=threads, chunk_bytes=chunk, n_work=n_work)


def _import_cupy() -> Any:
    try:
        import cupy
    except ImportError as e:
        raise TransportUnavailable(
            f"the CUDA gather/scatter kernels need cupy ({e}); install it with "
            "pip install 'pdfabric[cuda]', or pass backend='torch'"
        ) from None
    return cupy


def _kernels(device_index: int) -> tuple[Any, Any]:
    """(kv_gather, kv_scatter) of the module built for one device, built on first use."""
    with _lock:
        fns = _functions.get(device_index)
        if fns is None:
            cupy = _import_cupy()
            with cupy.cuda.Device(device_index):
                module = cupy.RawModule(code=source_text(), options=NVRTC_OPTIONS)
                fns = (module.get_function("kv_gather"), module.get_function("kv_scatter"))
            _functions[device_index] = fns
        return fns


def launch(
    kind: Literal["gather", "scatter"],
    layers: Sequence[torch.Tensor],
    geom: BlockGeometry,
    ids: torch.Tensor,
    staging: torch.Tensor,
) -> None:
    """Enqueue one kernel on torch's current stream; arguments were checked by the caller."""
    import numpy as np
    import torch

    device = geom.device
    index = device.index if device.index is not None else torch.cuda.current_device()
    gather_fn, scatter_fn = _kernels(index)
    n = int(ids.numel())
    ptrs = torch.tensor([t.data_ptr() for t in layers], dtype=torch.int64)
    if ids.device.type == "cpu":
        args = torch.cat([ptrs, ids]).pin_memory().to(device, non_blocking=True)
    else:
        args = torch.cat([ptrs.pin_memory().to(device, non_blocking=True), ids.to(device)])
    cfg = launch_config(geom, n, torch.cuda.get_device_properties(index).multi_processor_count)
    cupy = _import_cupy()
    fn = gather_fn if kind == "gather" else scatter_fn
    with cupy.cuda.Device(index):
        stream = external_stream(cupy, torch.cuda.current_stream(device).cuda_stream)
        fn(
            (cfg.grid,),
            (cfg.block,),
            (
                np.uint64(args.data_ptr()),
                np.int32(geom.outer),
                np.int64(geom.num_blocks),
                np.int64(geom.inner_bytes),
                np.uint64(args.data_ptr() + 8 * len(layers)),
                np.int64(n),
                np.uint64(staging.data_ptr()),
                np.int64(cfg.chunk_bytes),
                np.int64(cfg.n_work),
            ),
            stream=stream,
        )


class _StreamPointer:
    """A raw ``cudaStream_t`` behind the CUDA stream protocol (what ``Stream.from_external`` takes)."""

    def __init__(self, ptr: int) -> None:
        self.ptr = ptr

    def __cuda_stream__(self) -> tuple[int, int]:
        return (0, self.ptr)


def external_stream(cupy: Any, ptr: int) -> Any:
    """A cupy stream object for a stream made elsewhere (torch's): ``Stream.from_external``
    where cupy has it (14+, where ``ExternalStream`` is deprecated), ``ExternalStream`` before."""
    from_external = getattr(cupy.cuda.Stream, "from_external", None)
    if from_external is not None:
        try:
            return from_external(_StreamPointer(ptr))
        except (TypeError, ValueError, AttributeError):
            pass  # a cupy whose from_external wants another protocol version
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return cupy.cuda.ExternalStream(ptr)
