"""``PDFabricConnector``: pdfabric as a vLLM v1 KV connector.

Load it with::

    --kv-transfer-config '{"kv_connector": "PDFabricConnector",
                           "kv_connector_module_path": "pdfabric.connector.vllm",
                           "kv_role": "kv_producer",          # or kv_consumer / kv_both
                           "kv_load_failure_policy": "recompute",
                           "kv_connector_extra_config": {"control_port": 8101}}'

This class only routes vLLM's calls to the scheduler side (``scheduler.py``, in the
EngineCore process) or the worker side (``worker.py``, in each worker process);
version differences live in ``compat.py``.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from pdfabric.connector import compat
from pdfabric.connector.params import StepMeta
from pdfabric.connector.scheduler import FabricScheduler
from pdfabric.connector.settings import resolve_settings
from pdfabric.connector.worker import FabricWorker

if TYPE_CHECKING:
    import torch
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

__all__ = ["PDFabricConnector", "FabricMetadata"]

log = logging.getLogger("pdfabric.connector")


def _share_vllm_logging() -> None:
    """Route pdfabric's log records through vLLM's handlers (same format, same stream)."""
    ours, theirs = logging.getLogger("pdfabric"), logging.getLogger("vllm")
    if ours.handlers or not theirs.handlers:
        return
    for h in theirs.handlers:
        ours.addHandler(h)
    ours.setLevel(logging.INFO)
    ours.propagate = False


def _scheduler_cache(vllm_config: "VllmConfig", settings: Any, engine: str, block_size: int) -> tuple[Any, Any]:
    """The scheduler's cache client and chunk keyer (``(None, None)`` when the cache is off).

    Keys are seeded with what makes KV interchangeable (model, device, dtype, geometry,
    block size, tensor parallel size), so engines agree exactly when they can share chunks."""
    cs = settings.cache
    if cs is None:
        return None, None
    from pdfabric.cache.client import RemoteCacheClient
    from pdfabric.cache.keys import ChunkKeyer
    from pdfabric.connector.kvcache import cache_fingerprint, chunk_bytes_for
    from pdfabric.connector.local_cache import local_client
    from pdfabric.errors import ConfigError

    mc, pc = vllm_config.model_config, vllm_config.parallel_config
    if cs.chunk_tokens % block_size:
        raise ConfigError(f"{cs.chunk_tokens} is not a multiple of the block size {block_size}",
                          path="cache.chunk_tokens", source="kv_connector_extra_config")
    dtype = compat.kv_dtype(vllm_config)
    layers, heads, head_dim = mc.get_num_layers(pc), mc.get_num_kv_heads(pc), mc.get_head_size()
    model = settings.model_name or os.path.basename(str(mc.model).rstrip("/"))
    device = str(getattr(vllm_config.device_config, "device_type", "cpu"))
    fp = cache_fingerprint(model, device, str(dtype).replace("torch.", ""), layers, heads, head_dim, block_size,
                           pc.tensor_parallel_size)
    keyer = ChunkKeyer.create(fp, cs.chunk_tokens, block_size=block_size, salt=cs.salt)
    chunk = chunk_bytes_for(layers, heads, head_dim, dtype.itemsize, cs.chunk_tokens)
    if pc.tensor_parallel_size > 1:
        log.error("pdfabric cache: tensor parallel engines cannot use the shared cache yet; it is off")
        return None, None
    if device != "cpu":
        log.error("pdfabric cache: the shared cache copies KV in host memory; it is off for a KV cache on %s", device)
        return None, None
    if cs.server is not None:
        # the keying goes to the server, which publishes it for the proxy's lookups (unsalted only)
        return RemoteCacheClient(cs.server, chunk, name=f"{engine}/scheduler", timeout_s=cs.timeout_s,
                                 chunk_tokens=cs.chunk_tokens, fingerprint=fp, salted=bool(cs.salt)), keyer
    return local_client(cs, chunk), keyer


class FabricMetadata(KVConnectorMetadata):
    def __init__(self, step: StepMeta) -> None:
        self.step = step


class PDFabricConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole, kv_cache_config: "KVCacheConfig | None" = None) -> None:
        super().__init__(vllm_config, role, kv_cache_config)  # type: ignore[arg-type]
        _share_vllm_logging()
        compat.check_version()
        ktc = vllm_config.kv_transfer_config
        assert ktc is not None
        producer, consumer = bool(ktc.is_kv_producer), bool(ktc.is_kv_consumer)
        settings = resolve_settings(ktc.kv_connector_extra_config, needs_control_port=producer)
        block_size = int(vllm_config.cache_config.block_size)
        engine = settings.engine_name or f"{ktc.kv_role}-{os.getpid()}"
        self._sched: FabricScheduler | None = None
        self._worker: FabricWorker | None = None
        if ktc.kv_load_failure_policy != "recompute" and consumer:
            log.warning("pdfabric: kv_load_failure_policy is %r: a failed transfer fails the request; "
                        "set it to 'recompute' to recompute the prompt instead", ktc.kv_load_failure_policy)
        if role == KVConnectorRole.SCHEDULER:
            cache, keyer = _scheduler_cache(vllm_config, settings, engine, block_size)
            self._sched = FabricScheduler(
                settings, producer=producer, consumer=consumer, block_size=block_size, block_ids_of=self._block_ids,
                cache=cache, keyer=keyer,
            )
        else:
            model = settings.model_name or os.path.basename(str(vllm_config.model_config.model).rstrip("/"))
            pc = vllm_config.parallel_config
            rank = 0
            if pc.tensor_parallel_size > 1:
                from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

                rank = get_tensor_model_parallel_rank()
            self._worker = FabricWorker(
                settings, engine=engine, model=model, producer=producer, consumer=consumer,
                block_size=block_size, tp_rank=rank, tp_size=pc.tensor_parallel_size,
            )

    # -- scheduler side ------------------------------------------------------------------
    def _block_ids(self, req_id: str) -> list[int]:
        assert self._kv_cache_manager is not None
        return compat.first_group(self._kv_cache_manager.get_block_ids(req_id))

    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int | None, bool]:
        assert self._sched is not None
        return self._sched.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks", num_external_tokens: int) -> None:
        assert self._sched is not None
        self._sched.update_state_after_alloc(request, compat.first_group(blocks.get_block_ids()), num_external_tokens)

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        assert self._sched is not None
        return FabricMetadata(self._sched.build_meta(dict(scheduler_output.num_scheduled_tokens)))

    def request_finished(self, request: "Request", block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        assert self._sched is not None
        return self._sched.request_finished(request, compat.first_group(block_ids))

    def update_connector_output(self, connector_output: "KVConnectorOutput") -> None:
        assert self._sched is not None
        self._sched.transfers_finished(connector_output.finished_sending, connector_output.finished_recving)

    def has_pending_push_work(self) -> bool:
        return self._sched is not None and self._sched.has_pending_push_work()

    # -- worker side ---------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, "torch.Tensor"]) -> None:
        assert self._worker is not None
        self._worker.register_kv_caches(kv_caches)

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        if self._worker is not None:
            assert isinstance(connector_metadata, FabricMetadata)
            self._worker.bind(connector_metadata.step)

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        return None  # receives are pushed to us; grants leave from the first hook of the step

    def wait_for_layer_load(self, layer_name: str) -> None:
        return None  # requests wait (WAITING_FOR_REMOTE_KVS) until every layer landed

    def save_kv_layer(self, layer_name: str, kv_layer: "torch.Tensor", attn_metadata: Any, **kwargs: Any) -> None:
        if self._worker is not None:
            self._worker.save_kv_layer(layer_name)

    def wait_for_save(self) -> None:
        if self._worker is not None:
            self._worker.step_end()

    def get_transfer_results(self, finished_req_ids: set[str]) -> Any:
        assert self._worker is not None
        sending, recving, failed = self._worker.transfer_results()
        return compat.transfer_results(sending, recving, failed)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        assert self._worker is not None
        sending, recving, failed = self._worker.transfer_results()
        return sending or None, (recving | failed) or None

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.close()
