"""Copy one request's KV blocks, across all layers, to and from one contiguous buffer.

``gather_blocks(layers, ids)`` packs blocks ``ids`` of every layer into one staging
tensor; ``scatter_blocks(layers, ids, staging)`` unpacks it. On a GPU this is one kernel
launch (``csrc/kv_gather_scatter.cu``), so a transport moves a request with one
device-to-host copy instead of one per block; on the CPU it is torch index ops with the
same signature and result. The staging order and the rules are in
``pdfabric.kernels.blocks``; ``python -m pdfabric.kernels --bench`` measures the kernels
against a device-to-device copy. torch and cupy are imported on first use.
"""

from __future__ import annotations

from pdfabric.kernels.blocks import (
    Backend,
    BlockCopyError,
    BlockGeometry,
    block_geometry,
    gather_blocks,
    kernel_backend,
    scatter_blocks,
    staging_nbytes,
)

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
