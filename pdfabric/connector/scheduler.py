"""Scheduler side of the connector (runs in vLLM's EngineCore process).

It decides, per request, what the workers must do and tells them through the step
metadata; it never touches sockets or KV memory.

- consumer: a request with ``{"pdfabric": "consume"}`` params reports its prompt
  tokens (beyond a local prefix hit) as loadable asynchronously; once vLLM allocated
  blocks, the worker grants them to the producer. An abort while the request waits
  makes the worker revoke the grant and tell the producer.
- producer: a request with ``{"pdfabric": "produce"}`` params is followed until its
  final prefill step; when it finishes, its blocks are held (``delay_free``) until the
  worker reports the push done, aborted or its lease expired. Its response carries the
  decode leg's ``kv_transfer_params`` (sequential pairing).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import TYPE_CHECKING, Any, Callable

from pdfabric.cache.keys import ChunkKeyer
from pdfabric.connector import compat
from pdfabric.connector.kvcache import CacheLoad, CacheStore
from pdfabric.connector.params import (
    Consume,
    FinishedSend,
    Produce,
    RecvReq,
    SendReq,
    StepMeta,
    consume_params,
    parse_params,
)
from pdfabric.connector.settings import Resolved
from pdfabric.errors import ConfigError

if TYPE_CHECKING:
    from vllm.v1.request import Request

    from pdfabric.cache.client import CacheClient

__all__ = ["FabricScheduler"]

log = logging.getLogger("pdfabric.connector")


class FabricScheduler:
    def __init__(
        self,
        settings: Resolved,
        *,
        producer: bool,
        consumer: bool,
        block_size: int,
        block_ids_of: Callable[[str], list[int]],
        clock: Callable[[], float] = time.monotonic,
        cache: "CacheClient | None" = None,
        keyer: ChunkKeyer | None = None,
    ) -> None:
        self.settings = settings
        self.producer, self.consumer = producer, consumer
        self.block_size = block_size
        self._block_ids_of = block_ids_of
        self._clock = clock
        self.counters: Counter[str] = Counter()
        self._bad: set[str] = set()
        self._local_hit: dict[str, int] = {}  # consume req -> locally computed tokens
        self._waiting: dict[str, Consume] = {}  # consume reqs not yet given blocks
        self._receiving: dict[str, Consume] = {}  # granted, not yet reported finished
        self._received: set[str] = set()  # landed or failed: never asked for again
        self._producing: dict[str, tuple[Produce, "Request"]] = {}
        self._final_sent: set[str] = set()
        self._held: set[str] = set()  # delay-freed producer requests
        self._meta = StepMeta()
        self._last_heartbeat = clock()
        # the shared cache (None: off): lookups before computing, stores after
        self.cache, self.keyer = cache, keyer
        self._store = bool(cache is not None and settings.cache is not None and settings.cache.store)
        self._lookups: dict[str, tuple[list[bytes], int]] = {}  # req -> (prompt chunk keys, cached chunks)
        self._cache_plan: dict[str, tuple[int, int]] = {}  # req -> (local tokens, cached tokens)
        self._loading: set[str] = set()  # cache loads in flight (without a producer transfer)
        # consume requests whose uncached rest is computed here (the producer was told not to push)
        self._local_rest: set[str] = set()
        self._local_compute = settings.cache.local_compute_tokens if settings.cache is not None else 0

    # -- vLLM hooks --------------------------------------------------------------------
    def params(self, request: "Request") -> Produce | Consume | None:
        rid = request.request_id
        if rid in self._bad:
            return None
        try:
            p = parse_params(request.kv_transfer_params)
        except ConfigError as e:
            self._bad.add(rid)
            self.counters["bad_params"] += 1
            log.warning("pdfabric: request %s: %s: %s; it runs without a KV transfer", rid, e.path, e.message)
            return None
        if isinstance(p, Consume) and not self.consumer or isinstance(p, Produce) and not self.producer:
            self._bad.add(rid)
            self.counters["wrong_role"] += 1
            log.warning("pdfabric: request %s asks to %s KV but this engine's kv_role cannot; "
                        "it runs without a KV transfer", rid, type(p).__name__.lower())
            return None
        return p

    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int, bool]:
        p = self.params(request)
        rid = request.request_id
        if rid in self._receiving or rid in self._received or rid in self._loading:
            return 0, False
        cached = self._cached_tokens(request)
        if isinstance(p, Consume) and rid not in self._local_rest and cached > num_computed_tokens:
            rest = compat.prompt_len(request) - 1 - cached
            if rest <= self._local_compute:  # cheaper to compute than to wait for: the producer is told
                self._local_rest.add(rid)
                self.counters["cache_local_rest"] += 1
                self._meta.unsent_aborts.append((p.producer, p.transfer_id, f"the decode engine found all but {rest} "
                                                 "prompt tokens in the cache and computes them itself"))
        if not isinstance(p, Consume) or rid in self._local_rest:
            if cached <= num_computed_tokens:
                return 0, False
            self._cache_plan[rid] = (num_computed_tokens, cached)
            return cached - num_computed_tokens, True
        # every prompt token but the last: vLLM recomputes that one to sample the first output
        count = compat.prompt_len(request) - 1 - num_computed_tokens
        if count <= 0:
            return 0, False
        self._local_hit[rid] = num_computed_tokens
        self._waiting[rid] = p
        if cached > num_computed_tokens:
            self._cache_plan[rid] = (num_computed_tokens, cached)
        return count, True

    def _cached_tokens(self, request: "Request") -> int:
        """Leading prompt tokens (all but the last) whose KV the shared cache holds; asked
        once per request (vLLM asks us again while a request waits for room)."""
        if self.cache is None or self.keyer is None:
            return 0
        rid = request.request_id
        if rid not in self._lookups:
            tokens = request.prompt_token_ids or []
            keys = self._keys(request, tokens[: compat.prompt_len(request) - 1])
            n = self.cache.lookup(keys) if keys else 0
            self.counters["cache_lookups"] += 1
            self.counters["cache_lookup_chunks"] += len(keys)
            self.counters["cache_hit_chunks"] += n
            self._lookups[rid] = (keys, n)
        return self._lookups[rid][1] * self.keyer.chunk_tokens

    def _keys(self, request: "Request", tokens: Any) -> list[bytes]:
        """Chunk keys of ``tokens`` with the request's salt and multimodal items mixed in
        (none for a request whose items cannot be named: it neither loads nor stores)."""
        assert self.keyer is not None
        salt, extras = compat.cache_identity(request)
        if extras is None:
            self.counters["cache_unkeyable"] += 1
            return []
        return list(self.keyer.keys(tokens, salt=salt, extras=extras))

    def update_state_after_alloc(self, request: "Request", block_ids: list[int], num_external_tokens: int) -> None:
        p = self.params(request)
        rid = request.request_id
        if isinstance(p, Produce) and rid not in self._producing:
            self._producing[rid] = (p, request)
        plan = self._cache_plan.pop(rid, None)
        if num_external_tokens <= 0 or rid in self._receiving or rid in self._received or rid in self._loading:
            return
        if not isinstance(p, Consume) or rid in self._local_rest:
            if plan is not None:
                self._loading.add(rid)
                self._meta.cache_loads.append(self._load(rid, plan, block_ids, with_transfer=False))
            return
        n_prompt = compat.prompt_len(request)
        local = self._local_hit.pop(rid, 0)
        first = (plan[1] if plan is not None else local) // self.block_size
        need = -(-(n_prompt - 1) // self.block_size)
        self._waiting.pop(rid, None)
        self._receiving[rid] = p
        if plan is not None:
            self._meta.cache_loads.append(self._load(rid, plan, block_ids, with_transfer=first < need))
        if first < need:
            self._meta.recvs.append(RecvReq(rid, p.transfer_id, p.producer, list(block_ids[first:need]), first, n_prompt))
        else:  # the cache had it all: the producer must not wait for a grant
            self.counters["cache_skipped_transfers"] += 1
            self._meta.unsent_aborts.append((p.producer, p.transfer_id, "the decode engine found the prompt in the cache"))

    def _load(self, rid: str, plan: tuple[int, int], block_ids: list[int], *, with_transfer: bool) -> CacheLoad:
        assert self.keyer is not None
        local, cached = plan
        ct, bpc = self.keyer.chunk_tokens, self.keyer.chunk_tokens // self.block_size
        c0, c1 = local // ct, cached // ct
        keys = self._lookups[rid][0][c0:c1]
        self.counters["cache_loads"] += 1
        self.counters["cache_loaded_tokens"] += cached - local
        return CacheLoad(rid, keys, list(block_ids[c0 * bpc: c1 * bpc]), local // self.block_size - c0 * bpc,
                         with_transfer)

    def build_meta(self, num_scheduled: dict[str, int]) -> StepMeta:
        for rid, (p, req) in self._producing.items():
            n = num_scheduled.get(rid)
            if n is None or rid in self._final_sent:
                continue
            n_prompt = compat.prompt_len(req)
            if req.num_computed_tokens + n >= n_prompt:
                self._final_sent.add(rid)
                self._meta.sends.append(SendReq(rid, p.transfer_id, self._block_ids_of(rid), n_prompt))
        now = self._clock()
        if self._waiting and now - self._last_heartbeat >= self.settings.heartbeat_s:
            self._last_heartbeat = now
            for p in self._waiting.values():
                self._meta.heartbeats.setdefault(p.producer, []).append(p.transfer_id)
        meta, self._meta = self._meta, StepMeta()
        meta.idle = not any(num_scheduled.values())
        return meta

    def request_finished(self, request: "Request", block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        rid = request.request_id
        params = self.params(request)  # before forgetting _bad: a refused request is not parsed again
        self._bad.discard(rid)
        received = rid in self._received
        self._received.discard(rid)
        self._local_hit.pop(rid, None)
        waiting = self._waiting.pop(rid, None)
        local_rest = rid in self._local_rest
        self._local_rest.discard(rid)
        if waiting is None and isinstance(params, Consume) and not received and rid not in self._receiving \
                and not local_rest:
            # never granted: aborted while queued, or nothing to load (full local prefix hit,
            # 1-token prompt); either way its producer must not wait out a lease
            waiting = params
        if waiting is not None:  # never got blocks: tell the producer not to wait for a grant
            self._meta.unsent_aborts.append((waiting.producer, waiting.transfer_id, "the decode request ended before it was granted"))
        if self._receiving.pop(rid, None) is not None:
            self._meta.aborted_recvs.append(rid)
        self._loading.discard(rid)  # a load in flight still ends with finished_recving
        self._cache_plan.pop(rid, None)
        lookup = self._lookups.pop(rid, None)
        aborted = compat.is_aborted(request)
        entry = self._producing.pop(rid, None)
        push_held = entry is not None and bool(block_ids)
        stored = False
        if self._store and not aborted and block_ids:
            stored = self._store_finished(request, block_ids, lookup, with_push=push_held)
        if entry is None:
            if stored:
                self._held.add(rid)
            return stored, None
        p, _ = entry
        self._final_sent.discard(rid)
        self._meta.finished_sends.append(FinishedSend(rid, p.transfer_id, aborted, push_held))
        if push_held or stored:
            self._held.add(rid)
        if aborted or self.settings.control_port is None:
            return push_held or stored, None
        addr = f"{_bracket(self.settings.advertise_host)}:{self.settings.control_port}"
        return push_held or stored, consume_params(p.transfer_id, addr, compat.prompt_len(request))

    def _store_finished(self, request: "Request", block_ids: list[int], lookup: tuple[list[bytes], int] | None,
                        *, with_push: bool) -> bool:
        """Queue a store of the chunks of this request's computed tokens the cache lacks
        (prompt and output: the next turn of a conversation starts with them). True when
        its blocks must be held until the store is done."""
        assert self.cache is not None and self.keyer is not None
        tokens = list(request.all_token_ids)[: request.num_computed_tokens]
        keys = self._keys(request, tokens)
        bpc = self.keyer.chunk_tokens // self.block_size
        if not keys or len(block_ids) < len(keys) * bpc:
            return False
        known = self.cache.lookup(keys, count=False)
        if known >= len(keys):
            return False
        self.counters["cache_stores"] += 1
        self.counters["cache_stored_chunks"] += len(keys) - known
        self._meta.cache_stores.append(CacheStore(request.request_id, keys[known:],
                                                  list(block_ids[known * bpc: len(keys) * bpc]), with_push))
        return True

    def transfers_finished(self, finished_sending: set[str] | None, finished_recving: set[str] | None) -> None:
        for rid in finished_sending or ():
            self._held.discard(rid)
        for rid in finished_recving or ():
            if self._receiving.pop(rid, None) is not None:
                self._received.add(rid)
            if rid in self._loading:
                self._loading.discard(rid)
                self._received.add(rid)

    def has_pending_push_work(self) -> bool:
        return bool(self._held) or not self._meta.empty()


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
