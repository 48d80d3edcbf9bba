"""Producer (prefill) side of a push transfer, as a pure state machine: events in,
actions out, the clock passed in. No sockets, no threads, no transport.

Theory of operation. A transfer ``tid`` meets two independent arrivals in either order:
the engine computing the prompt (``scheduled`` each step, ``layer_saved`` per layer of
the final step, ``step_done``) and the consumer's ``Grant`` over the control plane.
Whichever comes second triggers the push of every layer not yet pushed.

Rules:

1. A layer is pushed at most once per transfer, only when both the grant and that layer's
   KV (final prefill step) are there.
2. The engine's blocks are released (``Release(req_id)`` -> vLLM ``finished_sending``)
   only after the request finished in the scheduler and no write of it is in flight.
3. A finished request whose grant never came is held until its lease expires; heartbeats
   from the consumer extend the lease. Expiry releases the blocks and is counted.
4. A grant for a transfer this engine has not seen waits ``grant_wait_s`` for the request;
   then the consumer is told (``SendAbort``), so it recomputes instead of hanging.
5. Any failure or abort on this side is told to the consumer; an abort from the consumer
   stops further pushes. Every ended transfer is remembered for a while so that a late
   grant gets a clear answer.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Union

from pdfabric.protocol.messages import Grant

__all__ = ["PushLayers", "SendAbort", "Release", "ProducerAction", "ProducerTable"]

_ENDED_MEMORY = 4096


@dataclass(frozen=True)
class PushLayers:
    transfer_id: str
    layers: tuple[int, ...]


@dataclass(frozen=True)
class SendAbort:
    peer: str
    transfer_id: str
    reason: str


@dataclass(frozen=True)
class Release:
    request_id: str
    transfer_id: str


ProducerAction = Union[PushLayers, SendAbort, Release]


@dataclass
class _Send:
    tid: str
    expires: float
    req_id: str | None = None
    blocks: list[int] = field(default_factory=list)
    prompt_len: int = 0
    final_step: bool = False  # the current step computes the last prompt tokens
    ready: bool = False  # every prompt token's KV is in place
    finished: bool = False  # the scheduler handed the blocks to us (delay_free)
    grant: Grant | None = None
    peer: str = ""
    pushed: set[int] = field(default_factory=set)
    landed: set[int] = field(default_factory=set)
    ended: str = ""  # why no more pushes happen ("" while live)

    @property
    def in_flight(self) -> int:
        return len(self.pushed) - len(self.landed)


class ProducerTable:
    """All transfers of one producer worker. Not thread safe: the caller holds a lock."""

    def __init__(self, num_layers: int, block_size: int, lease_s: float, grant_wait_s: float) -> None:
        self.num_layers = num_layers
        self.block_size = block_size
        self.lease_s = lease_s
        self.grant_wait_s = grant_wait_s
        self._sends: dict[str, _Send] = {}
        self._by_req: dict[str, str] = {}
        self._ended: OrderedDict[str, str] = OrderedDict()
        self.counters: Counter[str] = Counter()

    # -- queries ---------------------------------------------------------------------
    def get(self, tid: str) -> _Send | None:
        return self._sends.get(tid)

    def open_transfers(self) -> list[str]:
        return sorted(self._sends)

    def held_requests(self) -> list[str]:
        return sorted(s.req_id for s in self._sends.values() if s.req_id and s.finished)

    # -- engine events ---------------------------------------------------------------
    def scheduled(self, req_id: str, tid: str, blocks: list[int], prompt_len: int, computed: int, now: float) -> list[ProducerAction]:
        """The scheduler runs ``req_id`` this step; after it ``computed`` tokens have KV."""
        s = self._sends.get(tid)
        if s is None:
            s = self._sends[tid] = _Send(tid, now + self.lease_s)
            if tid in self._ended:  # the consumer gave up (or the id is reused): never push
                s.ended = self._ended[tid]
                self.counters["ended_before_prefill"] += 1
        s.req_id, s.blocks, s.prompt_len = req_id, list(blocks), prompt_len
        s.final_step = computed >= prompt_len and not s.ready
        self._by_req[req_id] = tid
        return self._check_grant(s)

    def layer_saved(self, layer: int) -> list[ProducerAction]:
        """The engine wrote ``layer``'s KV for this step (called in layer order)."""
        out: list[ProducerAction] = []
        for s in self._sends.values():
            if s.final_step and s.grant is not None and not s.ended and layer not in s.pushed:
                s.pushed.add(layer)
                out.append(PushLayers(s.tid, (layer,)))
        return out

    def step_done(self) -> list[ProducerAction]:
        """The step's forward finished: final-step transfers are ready to push whole."""
        out: list[ProducerAction] = []
        for s in self._sends.values():
            if s.final_step:
                s.final_step, s.ready = False, True
                out += self._push_rest(s)
        return out

    def finished(self, req_id: str, tid: str, aborted: bool, held: bool, now: float) -> list[ProducerAction]:
        """The scheduler finished ``req_id``; ``held``: it kept the blocks for us (Rule 2)."""
        s = self._sends.get(tid)
        if s is None:
            self._remember(tid, "the prefill request ended before any grant came")
            return [Release(req_id, tid)] if held else []
        s.req_id = req_id
        s.finished = True
        s.expires = max(s.expires, now + self.lease_s)
        out: list[ProducerAction] = []
        why = ""
        if not s.ended and not held:
            why = "the prefill request ended without KV to send"
        elif not s.ended and aborted and len(s.landed) < self.num_layers:
            why = "the prefill request was aborted"
            self.counters["local_aborts"] += 1
        if why:
            s.ended = why
            if s.grant is not None:
                out.append(SendAbort(s.peer, tid, why))
        if not held:
            self._end(s, s.ended)
            return out
        return out + self._maybe_release(s)

    # -- control-plane events ----------------------------------------------------------
    def granted(self, grant: Grant, peer: str, now: float) -> list[ProducerAction]:
        tid = grant.transfer_id
        s = self._sends.get(tid)
        if s is None:
            why = self._ended.get(tid)
            if why is not None:
                self.counters["late_grants"] += 1
                return [SendAbort(peer, tid, f"transfer already ended on the producer: {why}")]
            s = self._sends[tid] = _Send(tid, now + self.grant_wait_s)
        if s.grant is not None:
            self.counters["duplicate_grants"] += 1
            return [SendAbort(peer, tid, "transfer was already granted by another consumer")]
        if s.ended:
            return [SendAbort(peer, tid, f"transfer already ended on the producer: {s.ended}")]
        s.grant, s.peer = grant, peer
        s.expires = max(s.expires, now + self.grant_wait_s)
        self.counters["grants"] += 1
        return self._check_grant(s)

    def heartbeat(self, tids: list[str], now: float) -> None:
        for tid in tids:
            s = self._sends.get(tid)
            if s is not None and not s.ended:
                s.expires = max(s.expires, now + self.lease_s)

    def remote_abort(self, tid: str, reason: str) -> list[ProducerAction]:
        s = self._sends.get(tid)
        self.counters["remote_aborts"] += 1
        if s is None:  # before the prefill request arrived: it must not hold blocks for it
            self._remember(tid, f"the consumer aborted: {reason}")
            return []
        if not s.ended:
            s.ended = f"the consumer aborted: {reason}"
        return self._maybe_release(s)

    def push_result(self, tid: str, layer: int, error: str | None) -> list[ProducerAction]:
        s = self._sends.get(tid)
        if s is None or layer not in s.pushed or layer in s.landed:
            return []
        s.landed.add(layer)
        out: list[ProducerAction] = []
        if error is None:
            self.counters["layers_pushed"] += 1
        else:
            self.counters["push_failures"] += 1
            if not s.ended:
                s.ended = f"push of layer {layer} failed: {error}"
                out.append(SendAbort(s.peer, tid, s.ended))
        if len(s.landed) == self.num_layers and not s.ended:
            s.ended = "pushed"
            self.counters["transfers_pushed"] += 1
        return out + self._maybe_release(s)

    def tick(self, now: float) -> list[ProducerAction]:
        """Expire leases (Rule 3) and grants nobody asked for (Rule 4)."""
        out: list[ProducerAction] = []
        for s in list(self._sends.values()):
            if now < s.expires or s.in_flight:
                continue
            if s.req_id is None and s.grant is not None:
                self.counters["unknown_grants"] += 1
                why = f"no prefill request for this transfer arrived within {self.grant_wait_s:g}s"
                out.append(SendAbort(s.peer, s.tid, why))
                self._end(s, why)
            elif s.finished and not s.ended:
                self.counters["lease_expired"] += 1
                s.ended = f"lease expired after {self.lease_s:g}s without a grant from the consumer"
                if s.grant is not None:
                    out.append(SendAbort(s.peer, s.tid, s.ended))
                out += self._maybe_release(s)
        return out

    def drop_all(self, reason: str) -> list[ProducerAction]:
        """Shutdown: tell every consumer, release every held request."""
        out: list[ProducerAction] = []
        for s in list(self._sends.values()):
            if s.grant is not None and not s.ended:
                out.append(SendAbort(s.peer, s.tid, reason))
            s.ended = s.ended or reason
            s.landed |= s.pushed
            out += self._maybe_release(s)
        return out

    # -- internals ---------------------------------------------------------------------
    def _check_grant(self, s: _Send) -> list[ProducerAction]:
        g = s.grant
        if g is None or s.req_id is None or s.ended:
            return []
        want = -(-(s.prompt_len - 1) // self.block_size)  # the last token is recomputed by the consumer
        if g.num_tokens != s.prompt_len or len(g.blocks) + g.first_block != want or g.first_block < 0:
            s.ended = (
                f"grant does not match the prompt: consumer has {g.num_tokens} tokens in "
                f"{g.first_block}+{len(g.blocks)} blocks, producer {s.prompt_len} tokens in {want} blocks"
            )
            self.counters["mismatched_grants"] += 1
            return [SendAbort(s.peer, s.tid, s.ended)] + self._maybe_release(s)
        return self._push_rest(s) if s.ready else []

    def _push_rest(self, s: _Send) -> list[ProducerAction]:
        if s.grant is None or s.ended or not s.ready:
            return []
        rest = tuple(i for i in range(self.num_layers) if i not in s.pushed)
        if not rest:
            return []
        s.pushed.update(rest)
        return [PushLayers(s.tid, rest)]

    def _maybe_release(self, s: _Send) -> list[ProducerAction]:
        if s.in_flight or not s.ended:
            return []
        if s.req_id is not None and not s.finished:
            return []  # the engine still owns the blocks; finished() releases them
        self._end(s, s.ended)
        return [Release(s.req_id, s.tid)] if s.req_id is not None else []

    def _end(self, s: _Send, why: str) -> None:
        self._sends.pop(s.tid, None)
        if s.req_id is not None:
            self._by_req.pop(s.req_id, None)
        self._remember(s.tid, why)

    def _remember(self, tid: str, why: str) -> None:
        self._ended[tid] = why
        while len(self._ended) > _ENDED_MEMORY:
            self._ended.popitem(last=False)
