"""Consumer (decode) side of a push transfer, as a pure state machine.

Theory of operation. The scheduler reserved blocks for a prompt whose KV a producer
computes; the worker grants those blocks on its transport (one sub-grant per layer) and
sends ``Grant`` to the producer. The transfer ends in exactly one way:

Rules:

1. Every layer's sub-transfer landed                -> ``Finish(ok=True)``.
2. A layer failed, the producer aborted, or the deadline passed
                                                     -> ``Revoke`` + ``Finish(ok=False)``;
   the engine then recomputes the prompt (vLLM ``kv_load_failure_policy=recompute``),
   the reason is logged and counted. A producer is told (``SendAbort``) unless it
   was the one that aborted.
3. The request was aborted on this engine           -> ``Revoke`` + ``SendAbort`` +
   ``Finish(ok=True, aborted=True)``: vLLM only needs to know the blocks are ours again.
4. ``Revoke`` always comes before ``Finish``: the worker revokes (which waits out any
   write in progress) before it reports the request, so no byte lands in a block that
   vLLM has handed back.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Union

from pdfabric.protocol.messages import Grant

__all__ = ["SendGrant", "Revoke", "Finish", "ConsumerAction", "ConsumerTable", "Recv"]


@dataclass(frozen=True)
class SendGrant:
    producer: str
    grant: Grant


@dataclass(frozen=True)
class Revoke:
    transfer_id: str
    layers: tuple[int, ...]


@dataclass(frozen=True)
class SendAbort:
    producer: str
    transfer_id: str
    reason: str


@dataclass(frozen=True)
class Finish:
    request_id: str
    transfer_id: str
    ok: bool
    reason: str = ""
    aborted: bool = False
    nbytes: int = field(default=0, compare=False)  # for status reports only
    started: float = field(default=0.0, compare=False)


ConsumerAction = Union[SendGrant, Revoke, SendAbort, Finish]


@dataclass
class Recv:
    req_id: str
    tid: str
    producer: str
    deadline: float
    started: float
    landed: set[int] = field(default_factory=set)
    nbytes: int = 0


class ConsumerTable:
    """All receives of one consumer worker. Not thread safe: the caller holds a lock."""

    def __init__(self, num_layers: int, engine: str, timeout_s: float) -> None:
        self.num_layers = num_layers
        self.engine = engine
        self.timeout_s = timeout_s
        self._recvs: dict[str, Recv] = {}
        self._by_req: dict[str, str] = {}
        self.counters: Counter[str] = Counter()

    def get(self, tid: str) -> Recv | None:
        return self._recvs.get(tid)

    def by_request(self, req_id: str) -> Recv | None:
        tid = self._by_req.get(req_id)
        return self._recvs.get(tid) if tid else None

    def open_transfers(self) -> list[str]:
        return sorted(self._recvs)

    def requested(
        self, req_id: str, tid: str, producer: str, blocks: list[int], first_block: int, num_tokens: int, now: float
    ) -> list[ConsumerAction]:
        """The scheduler reserved ``blocks`` for ``req_id``: grant them to the producer."""
        if tid in self._recvs:
            self.counters["duplicate_transfer_ids"] += 1
            return [Finish(req_id, tid, False, f"transfer id {tid!r} is already in use on this engine")]
        self._recvs[tid] = Recv(req_id, tid, producer, now + self.timeout_s, now)
        self._by_req[req_id] = tid
        self.counters["grants"] += 1
        grant = Grant(tid, self.engine, list(blocks), first_block, num_tokens, self.timeout_s)
        return [SendGrant(producer, grant)]

    def layer_landed(self, tid: str, layer: int, nbytes: int) -> list[ConsumerAction]:
        r = self._recvs.get(tid)
        if r is None or layer in r.landed:
            return []
        r.landed.add(layer)
        r.nbytes += nbytes
        if len(r.landed) < self.num_layers:
            return []
        self._drop(r)
        self.counters["transfers_received"] += 1
        return [Finish(r.req_id, tid, True, nbytes=r.nbytes, started=r.started)]

    def failed(self, tid: str, reason: str, tell_producer: bool = True) -> list[ConsumerAction]:
        r = self._recvs.get(tid)
        if r is None:
            return []
        self._drop(r)
        self.counters["transfers_failed"] += 1
        out: list[ConsumerAction] = [Revoke(tid, self._open_layers(r))]
        if tell_producer:
            out.append(SendAbort(r.producer, tid, reason))
        return out + [Finish(r.req_id, tid, False, reason)]

    def remote_abort(self, tid: str, reason: str) -> list[ConsumerAction]:
        if tid in self._recvs:
            self.counters["remote_aborts"] += 1
        return self.failed(tid, f"the producer aborted: {reason}", tell_producer=False)

    def local_abort(self, req_id: str) -> list[ConsumerAction]:
        r = self.by_request(req_id)
        if r is None:
            return []
        self._drop(r)
        self.counters["local_aborts"] += 1
        reason = "the decode request was aborted"
        return [Revoke(r.tid, self._open_layers(r)), SendAbort(r.producer, r.tid, reason),
                Finish(r.req_id, r.tid, True, reason, aborted=True)]

    def tick(self, now: float) -> list[ConsumerAction]:
        out: list[ConsumerAction] = []
        for r in list(self._recvs.values()):
            if now >= r.deadline:
                self.counters["timeouts"] += 1
                why = (f"timed out after {self.timeout_s:g}s waiting for the producer "
                       f"({len(r.landed)} of {self.num_layers} layers landed)")
                out += self.failed(r.tid, why)
        return out

    def drop_all(self, reason: str) -> list[ConsumerAction]:
        out: list[ConsumerAction] = []
        for tid in list(self._recvs):
            out += self.failed(tid, reason)
        return out

    def _open_layers(self, r: Recv) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_layers) if i not in r.landed)

    def _drop(self, r: Recv) -> None:
        self._recvs.pop(r.tid, None)
        self._by_req.pop(r.req_id, None)
