"""Gather one request's KV blocks into one staging buffer, and scatter them back.

Theory of operation
-------------------
Every layer tensor is viewed as bytes, ``[outer, num_blocks, inner_bytes]``: ``outer`` is
the product of the dims before the block dim (2 for the flash-attn K/V planes, 1 for the
CPU and MLA layouts) and ``inner_bytes`` the bytes after it. Because layer tensors are
contiguous, ``t[..., id, ...]`` of one outer index is one run of ``inner_bytes`` bytes.

Rule 1 - staging order. The staging buffer is, for each layer in the order given,
``layer.index_select(block_dim, ids)`` flattened: a flash layer contributes all its K
blocks then all its V blocks; a CPU or MLA layer its blocks in id order. Its size is
``num_layers * outer * len(ids) * inner_bytes`` bytes (``staging_nbytes``).

Rule 2 - one geometry. All layers have one shape, dtype and device, and are contiguous;
ids lie in ``0..num_blocks-1``. Anything else is a ``BlockCopyError`` (a ``ValueError``
and a ``LayoutError``) naming the layer, id or argument, before any byte moves.

Rule 3 - bytes are bytes. The copy is of bytes, so any dtype works (fp8 too), and the
staging buffer may have the layers' dtype or ``uint8``.

Backends: ``"cuda"`` launches the kernels of ``csrc/kv_gather_scatter.cu`` (one launch for
all layers) on torch's current stream; ``"torch"`` runs ``index_select`` /
``index_copy_`` per layer on any device. ``"auto"`` picks ``cuda`` for CUDA tensors when
cupy is installed, else ``torch``; ``kernel_backend`` says which one a device gets. Both
return the same bytes. The cuda backend is asynchronous like any kernel: the staging
buffer (and, for scatter, the layers) are ready once torch's current stream reaches
this point. Calls are thread safe; concurrent scatters into the same blocks race.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pdfabric.errors import LayoutError

if TYPE_CHECKING:
    import torch

__all__ = [
    "Backend",
    "BlockCopyError",
    "BlockGeometry",
    "block_geometry",
    "gather_blocks",
    "kernel_backend",
    "scatter_blocks",
    "staging_nbytes",
]

Backend = Literal["auto", "cuda", "torch"]


class BlockCopyError(LayoutError, ValueError):
    """Arguments of a gather/scatter that do not fit together (bad id, geometry, staging)."""


@dataclass(frozen=True, slots=True)
class BlockGeometry:
    """The layers of a KV cache seen as bytes ``[outer, num_blocks, inner_bytes]`` each."""

    num_layers: int
    outer: int
    num_blocks: int
    inner_bytes: int
    block_dim: int
    dtype: Any  # torch.dtype
    device: Any  # torch.device

    def staging_nbytes(self, num_ids: int) -> int:
        """Bytes of the staging buffer for ``num_ids`` ids (Rule 1)."""
        return self.num_layers * self.outer * num_ids * self.inner_bytes


def _default_block_dim(shape: tuple[int, ...]) -> int:
    """vLLM's block dim: 1 for flash ``[2, num_blocks, ...]``, 0 for CPU (4-D) and MLA (3-D)."""
    if len(shape) == 5 and shape[0] == 2:
        return 1
    if len(shape) in (3, 4):
        return 0
    raise BlockCopyError(
        f"layers[0]: cannot tell the block dim of a tensor of shape {list(shape)}; expected flash "
        "[2, num_blocks, ...] (5-D), cpu [num_blocks, kv_heads, block_size, 2*head_dim] or mla "
        "[num_blocks, block_size, latent_dim] - pass block_dim= for other layouts"
    )


def block_geometry(layers: Sequence[torch.Tensor], *, block_dim: int | None = None) -> BlockGeometry:
    """Check that ``layers`` share one dense geometry (Rule 2) and describe it."""
    import torch

    if isinstance(layers, torch.Tensor) or not isinstance(layers, Sequence) or not layers:
        raise BlockCopyError(
            f"layers: expected a non-empty sequence of tensors (one per layer), got {type(layers).__name__}"
        )
    first = layers[0]
    for i, t in enumerate(layers):
        if not isinstance(t, torch.Tensor):
            raise BlockCopyError(f"layers[{i}]: expected a torch.Tensor, got {type(t).__name__}")
        for what in ("shape", "dtype", "device"):
            a, b = getattr(t, what), getattr(first, what)
            if a != b:
                raise BlockCopyError(
                    f"layers[{i}]: {what} {_fmt(a)} differs from {_fmt(b)} of layers[0]; "
                    "all layers must share one geometry"
                )
        if not t.is_contiguous():
            raise BlockCopyError(
                f"layers[{i}]: tensor is not contiguous (strides {list(t.stride())}); each layer's "
                "KV must be one dense tensor"
            )
    shape = tuple(int(s) for s in first.shape)
    bd = _default_block_dim(shape) if block_dim is None else block_dim
    if isinstance(bd, bool) or not isinstance(bd, int) or not 0 <= bd < len(shape):
        raise BlockCopyError(f"block_dim: expected 0..{len(shape) - 1} for shape {list(shape)}, got {bd!r}")
    return BlockGeometry(
        num_layers=len(layers),
        outer=math.prod(shape[:bd]),
        num_blocks=shape[bd],
        inner_bytes=math.prod(shape[bd + 1 :]) * first.element_size(),
        block_dim=bd,
        dtype=first.dtype,
        device=first.device,
    )


def _fmt(value: Any) -> str:
    return str(list(value)) if isinstance(value, tuple) else str(value)


def staging_nbytes(
    layers: Sequence[torch.Tensor], num_ids: int, *, block_dim: int | None = None
) -> int:
    """Bytes ``gather_blocks`` writes for ``num_ids`` block ids."""
    return block_geometry(layers, block_dim=block_dim).staging_nbytes(num_ids)


def _check_ids(block_ids: Any, num_blocks: int) -> torch.Tensor:
    """Ids as a 1-D int64 tensor (on the device it came on), each in ``0..num_blocks-1``."""
    import torch

    if isinstance(block_ids, torch.Tensor):
        dt = block_ids.dtype
        if block_ids.dim() != 1 or dt.is_floating_point or dt.is_complex or dt == torch.bool:
            raise BlockCopyError(
                f"block_ids: expected a 1-D integer tensor, got {block_ids.dtype} of shape "
                f"{list(block_ids.shape)}"
            )
        ids = block_ids.to(torch.int64)
    else:
        try:
            ids = torch.tensor([operator.index(i) for i in block_ids], dtype=torch.int64)
        except TypeError as e:
            raise BlockCopyError(f"block_ids: expected a sequence of ints: {e}") from None
    if ids.numel():
        bad = (ids < 0) | (ids >= num_blocks)
        if bool(bad.any()):  # one device sync when the ids live on a GPU
            pos = int(bad.nonzero()[0, 0])
            raise BlockCopyError(
                f"block_ids[{pos}] = {int(ids[pos])} is out of range: the layers have "
                f"num_blocks={num_blocks} (valid 0..{num_blocks - 1})"
            )
    return ids


def _check_staging(what: str, staging: Any, geom: BlockGeometry, num_ids: int) -> None:
    import torch

    if not isinstance(staging, torch.Tensor):
        raise BlockCopyError(f"{what}: expected a torch.Tensor, got {type(staging).__name__}")
    if staging.device != geom.device:
        raise BlockCopyError(
            f"{what}: is on {staging.device} but the layers are on {geom.device}; stage on the "
            "layers' device, then move the whole buffer with one copy"
        )
    if staging.dtype not in (geom.dtype, torch.uint8):
        raise BlockCopyError(
            f"{what}: dtype {staging.dtype} does not match the layers' {geom.dtype} (or torch.uint8)"
        )
    if not staging.is_contiguous():
        raise BlockCopyError(f"{what}: must be contiguous (strides {list(staging.stride())})")
    want, got = geom.staging_nbytes(num_ids), staging.numel() * staging.element_size()
    if got != want:
        raise BlockCopyError(
            f"{what}: holds {got} bytes, expected {want} ({geom.num_layers} layers x {geom.outer} x "
            f"{num_ids} ids x {geom.inner_bytes} bytes)"
        )


def kernel_backend(device: Any) -> Literal["cuda", "torch"]:
    """The backend ``"auto"`` picks for tensors on ``device``."""
    import torch

    from pdfabric.kernels import cuda

    if torch.device(device).type == "cuda" and cuda.cupy_available():
        return "cuda"
    return "torch"


def _resolve(backend: Backend, geom: BlockGeometry) -> Literal["cuda", "torch"]:
    if backend == "auto":
        return kernel_backend(geom.device)
    if backend == "torch":
        return "torch"
    if backend == "cuda":
        if geom.device.type != "cuda":
            raise BlockCopyError(f"backend='cuda' needs CUDA tensors; the layers are on {geom.device}")
        return "cuda"
    raise BlockCopyError(f"backend: expected 'auto', 'cuda' or 'torch', got {backend!r}")


def _byte_views(layers: Sequence[torch.Tensor], geom: BlockGeometry) -> list[torch.Tensor]:
    import torch

    shape = (geom.outer, geom.num_blocks, geom.inner_bytes)
    return [t.view(torch.uint8).view(shape) for t in layers]


def _unit(geom: BlockGeometry, *tensors: torch.Tensor) -> torch.dtype:
    """The widest integer element that tiles a block and every tensor's start: torch's CPU
    ``index_copy_`` moves bytes one element at a time (8x slower on uint8 than on int64)."""
    import torch

    for size, dt in ((8, torch.int64), (4, torch.int32), (2, torch.int16)):
        if geom.inner_bytes % size == 0 and all(
            t.data_ptr() % size == 0 and t.storage_offset() * t.element_size() % size == 0 for t in tensors
        ):
            return dt
    return torch.uint8


def _torch_copy(layers: Sequence[torch.Tensor], geom: BlockGeometry, ids: torch.Tensor, staging: torch.Tensor,
                gather: bool) -> None:
    """The torch backend: per layer, ``index_select`` (gather) or ``index_copy_`` (scatter)."""
    import torch

    ids = ids.to(geom.device)
    unit = _unit(geom, staging, *layers)
    for kv, st in zip(_byte_views(layers, geom), _staging_views(staging, geom, int(ids.numel()))):
        kv, st = kv.view(unit), st.view(unit)
        if gather:
            torch.index_select(kv, 1, ids, out=st)
        else:
            kv.index_copy_(1, ids, st)


def _staging_views(staging: torch.Tensor, geom: BlockGeometry, num_ids: int) -> list[torch.Tensor]:
    """One ``[outer, num_ids, inner_bytes]`` byte view of the staging buffer per layer."""
    import torch

    flat = staging.view(torch.uint8).view(geom.num_layers, geom.outer, num_ids, geom.inner_bytes)
    return list(flat.unbind(0))


def gather_blocks(
    layers: Sequence[torch.Tensor],
    block_ids: Sequence[int] | torch.Tensor,
    out: torch.Tensor | None = None,
    *,
    block_dim: int | None = None,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Copy blocks ``block_ids`` of every layer into one contiguous buffer (Rule 1).

    ``out`` (contiguous, on the layers' device, their dtype or ``uint8``, exactly
    ``staging_nbytes`` bytes) is written and returned; without it a 1-D tensor of the
    layers' dtype is allocated. Ids may repeat. The caller owns ``out``.
    """
    import torch

    geom = block_geometry(layers, block_dim=block_dim)
    ids = _check_ids(block_ids, geom.num_blocks)
    n = int(ids.numel())
    if out is None:
        out = torch.empty(
            geom.staging_nbytes(n) // layers[0].element_size(), dtype=geom.dtype, device=geom.device
        )
    else:
        _check_staging("out", out, geom, n)
    if n == 0:
        return out
    if _resolve(backend, geom) == "cuda":
        from pdfabric.kernels import cuda

        cuda.launch("gather", layers, geom, ids, out)
        return out
    _torch_copy(layers, geom, ids, out, gather=True)
    return out


def scatter_blocks(
    layers: Sequence[torch.Tensor],
    block_ids: Sequence[int] | torch.Tensor,
    staging: torch.Tensor,
    *,
    block_dim: int | None = None,
    backend: Backend = "auto",
) -> None:
    """Copy a staging buffer laid out by Rule 1 into blocks ``block_ids`` of every layer.

    The inverse of ``gather_blocks`` with the same ids; other blocks are not touched. With
    a repeated id, which of its copies lands is unspecified unless they are equal.
    """
    geom = block_geometry(layers, block_dim=block_dim)
    ids = _check_ids(block_ids, geom.num_blocks)
    n = int(ids.numel())
    _check_staging("staging", staging, geom, n)
    if n == 0:
        return
    if _resolve(backend, geom) == "cuda":
        from pdfabric.kernels import cuda

        cuda.launch("scatter", layers, geom, ids, staging)
        return
    _torch_copy(layers, geom, ids, staging, gather=False)
