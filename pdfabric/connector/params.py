"""``kv_transfer_params`` as pdfabric reads and writes them, and the per-step metadata
the scheduler side hands to the worker side.

In an OpenAI request body (the proxy writes these)::

    prefill leg: {"pdfabric": "produce", "transfer_id": "t-42"}
    decode leg:  {"pdfabric": "consume", "transfer_id": "t-42", "producer": "127.0.0.1:8101"}

The prefill engine's response carries the decode leg's params (``request_finished``),
so a sequential client can forward them unchanged. Parameters without a ``pdfabric`` key
belong to someone else and are ignored; malformed pdfabric parameters are refused with a
message naming the field (the request then runs without a transfer, loudly).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from pdfabric.errors import ConfigError

__all__ = ["Produce", "Consume", "parse_params", "SendReq", "RecvReq", "FinishedSend", "StepMeta"]

MAX_TRANSFER_ID = 100
_TID = re.compile(r"[A-Za-z0-9._:@/+=-]+")
_ADDR = re.compile(r"(?P<host>\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+):(?P<port>[0-9]{1,5})")


@dataclass(frozen=True)
class Produce:
    transfer_id: str


@dataclass(frozen=True)
class Consume:
    transfer_id: str
    producer: str  # host:port of the producer's control endpoint
    num_tokens: int | None = None


def _tid(params: dict[str, Any]) -> str:
    tid = params.get("transfer_id")
    if not isinstance(tid, str) or not tid or len(tid) > MAX_TRANSFER_ID or not _TID.fullmatch(tid):
        raise ConfigError(
            f"expected 1-{MAX_TRANSFER_ID} characters of [A-Za-z0-9._:@/+=-], got {tid!r}",
            path="kv_transfer_params.transfer_id",
        )
    return tid


def parse_params(params: dict[str, Any] | None) -> Produce | Consume | None:
    """pdfabric's part of a request's ``kv_transfer_params``; ``ConfigError`` if malformed."""
    if not params or "pdfabric" not in params:
        return None
    if not isinstance(params, dict):
        raise ConfigError(f"expected a mapping, got {type(params).__name__}", path="kv_transfer_params")
    mode = params["pdfabric"]
    allowed = {"produce": {"pdfabric", "transfer_id"}, "consume": {"pdfabric", "transfer_id", "producer", "num_tokens"}}
    if mode not in allowed:
        raise ConfigError(f"expected 'produce' or 'consume', got {mode!r}", path="kv_transfer_params.pdfabric")
    extra = sorted(set(params) - allowed[mode])
    if extra:
        raise ConfigError(f"unknown key {extra[0]!r} for {mode!r}; keys are {sorted(allowed[mode])}",
                          path=f"kv_transfer_params.{extra[0]}")
    tid = _tid(params)
    if mode == "produce":
        return Produce(tid)
    producer = params.get("producer")
    if not isinstance(producer, str) or not _ADDR.fullmatch(producer) or not 0 < int(producer.rsplit(":", 1)[1]) < 65536:
        raise ConfigError(f"expected host:port of the producer's control endpoint, got {producer!r}",
                          path="kv_transfer_params.producer")
    n = params.get("num_tokens")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ConfigError(f"expected a positive integer, got {n!r}", path="kv_transfer_params.num_tokens")
    return Consume(tid, producer, n)


def consume_params(tid: str, producer: str, num_tokens: int) -> dict[str, Any]:
    return {"pdfabric": "consume", "transfer_id": tid, "producer": producer, "num_tokens": num_tokens}


# -- scheduler -> worker metadata (pickled by vLLM's executors) ------------------------


@dataclass(frozen=True)
class SendReq:
    """A produce request runs its final prefill step now: its KV is complete after it."""

    req_id: str
    transfer_id: str
    blocks: list[int]
    prompt_len: int


@dataclass(frozen=True)
class RecvReq:
    """A consume request got blocks: grant ``blocks`` (prompt blocks ``first_block..``)."""

    req_id: str
    transfer_id: str
    producer: str
    blocks: list[int]
    first_block: int
    num_tokens: int


@dataclass(frozen=True)
class FinishedSend:
    req_id: str
    transfer_id: str
    aborted: bool
    held: bool


@dataclass
class StepMeta:
    sends: list[SendReq] = field(default_factory=list)
    recvs: list[RecvReq] = field(default_factory=list)
    finished_sends: list[FinishedSend] = field(default_factory=list)
    aborted_recvs: list[str] = field(default_factory=list)
    # (producer, transfer_id, reason): tell a producer we will not grant (aborted early)
    unsent_aborts: list[tuple[str, str, str]] = field(default_factory=list)
    heartbeats: dict[str, list[str]] = field(default_factory=dict)
    cache_loads: list[Any] = field(default_factory=list)  # kvcache.CacheLoad
    cache_stores: list[Any] = field(default_factory=list)  # kvcache.CacheStore
    idle: bool = False  # the engine computes nothing this step (a pure connector step)

    def empty(self) -> bool:
        return not (self.sends or self.recvs or self.finished_sends or self.aborted_recvs
                    or self.unsent_aborts or self.heartbeats or self.cache_loads or self.cache_stores)
