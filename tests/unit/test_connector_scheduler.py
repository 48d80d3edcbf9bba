"""``FabricScheduler``: the scheduler side of the connector, driven with fake requests (no engine)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import pytest

from pdfabric.connector.params import FinishedSend, RecvReq, SendReq
from pdfabric.connector.scheduler import FabricScheduler
from pdfabric.connector.settings import resolve_settings

# compat.is_aborted reads vLLM's RequestStatus; importing vLLM (torch) warns on import.
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    RequestStatus = pytest.importorskip("vllm.v1.request").RequestStatus

BLOCK = 4
PROMPT = 10  # -> 3 blocks
PRODUCER = "127.0.0.1:8101"


@dataclass
class Req:
    request_id: str
    kv_transfer_params: dict[str, Any] | None
    num_prompt_tokens: int = PROMPT
    num_computed_tokens: int = 0
    status: Any = RequestStatus.WAITING


class Clock:
    t = 100.0

    def __call__(self) -> float:
        return self.t


def consume(rid: str = "r1", tid: str = "t1") -> Req:
    return Req(rid, {"pdfabric": "consume", "transfer_id": tid, "producer": PRODUCER})


def produce(rid: str = "p1", tid: str = "t1") -> Req:
    return Req(rid, {"pdfabric": "produce", "transfer_id": tid})


def sched(*, producer: bool = True, consumer: bool = True, clock: Clock | None = None,
          extra: dict[str, Any] | None = None) -> FabricScheduler:
    settings = resolve_settings(extra if extra is not None else {"control_port": 8101, "advertise_host": "10.0.0.7"},
                                needs_control_port=False)
    return FabricScheduler(settings, producer=producer, consumer=consumer, block_size=BLOCK,
                           block_ids_of=lambda rid: [21, 22, 23], clock=clock or Clock())


def start_recv(s: FabricScheduler, req: Req, local_hit: int = 0) -> RecvReq:
    # every prompt token but the last (vLLM recomputes it to sample the first output token)
    assert s.get_num_new_matched_tokens(req, local_hit) == (PROMPT - 1 - local_hit, True)
    s.update_state_after_alloc(req, [10, 11, 12], PROMPT - 1 - local_hit)
    (recv,) = s.build_meta({}).recvs
    return recv


def run_prefill(s: FabricScheduler, req: Req) -> list[SendReq]:
    """Allocate, then two chunks of prefill (4 + 6 tokens); the SendReqs of all steps."""
    assert s.get_num_new_matched_tokens(req, 0) == (0, False)
    s.update_state_after_alloc(req, [21, 22, 23], 0)
    sends = s.build_meta({req.request_id: 4}).sends
    req.num_computed_tokens = 4
    sends += s.build_meta({req.request_id: 6}).sends
    req.num_computed_tokens = PROMPT
    return sends + s.build_meta({req.request_id: 1}).sends


# -- consumer ------------------------------------------------------------------------------


@pytest.mark.parametrize("local_hit, first, blocks", [(0, 0, [10, 11, 12]), (4, 1, [11, 12]), (8, 2, [12])])
def test_consume_grants_blocks_after_the_local_hit(local_hit: int, first: int, blocks: list[int]) -> None:
    s = sched()
    recv = start_recv(s, consume(), local_hit)
    assert recv == RecvReq("r1", "t1", PRODUCER, blocks, first, PROMPT)
    assert s.build_meta({}).empty()


def test_block_holding_only_the_last_token_is_not_granted() -> None:
    s = sched()
    req = Req("r9", {"pdfabric": "consume", "transfer_id": "t9", "producer": PRODUCER}, num_prompt_tokens=9)
    assert s.get_num_new_matched_tokens(req, 0) == (8, True)
    s.update_state_after_alloc(req, [10, 11, 12], 8)
    assert s.build_meta({}).recvs[0].blocks == [10, 11]


def test_one_token_prompt_has_nothing_to_transfer() -> None:
    s = sched()
    req = Req("r1", {"pdfabric": "consume", "transfer_id": "t1", "producer": PRODUCER}, num_prompt_tokens=1)
    assert s.get_num_new_matched_tokens(req, 0) == (0, False)


def test_consume_ignores_blocks_beyond_the_prompt() -> None:
    s = sched()
    req = consume()
    s.get_num_new_matched_tokens(req, 0)
    s.update_state_after_alloc(req, [10, 11, 12, 13, 14], PROMPT)  # room for decode tokens too
    assert s.build_meta({}).recvs[0].blocks == [10, 11, 12]


def test_consume_asks_once_while_receiving() -> None:
    s = sched()
    req = consume()
    start_recv(s, req)
    assert s.get_num_new_matched_tokens(req, 0) == (0, False)
    s.update_state_after_alloc(req, [10, 11, 12], PROMPT)
    assert s.build_meta({}).recvs == []


def test_no_transfer_without_external_tokens() -> None:
    s = sched()
    req = consume()
    assert s.get_num_new_matched_tokens(req, PROMPT) == (0, False)
    s.update_state_after_alloc(req, [10, 11, 12], 0)
    assert s.build_meta({}).empty()


def test_consume_finished_while_receiving_is_an_aborted_recv() -> None:
    s = sched()
    req = consume()
    start_recv(s, req)
    req.status = RequestStatus.FINISHED_ABORTED
    assert s.request_finished(req, [10, 11, 12]) == (False, None)
    meta = s.build_meta({})
    assert meta.aborted_recvs == ["r1"] and meta.unsent_aborts == []


def test_consume_finished_while_waiting_tells_the_producer() -> None:
    s = sched()
    req = consume()
    s.get_num_new_matched_tokens(req, 0)  # no blocks yet
    req.status = RequestStatus.FINISHED_ABORTED
    assert s.request_finished(req, []) == (False, None)
    meta = s.build_meta({})
    assert meta.aborted_recvs == [] and meta.recvs == []
    assert [(p, t) for p, t, _ in meta.unsent_aborts] == [(PRODUCER, "t1")]


def test_finished_recv_is_neither_aborted_nor_asked_again() -> None:
    s = sched()
    req = consume()
    start_recv(s, req)
    s.transfers_finished(None, {"r1"})
    # A failed receive with kv_load_failure_policy=recompute (or a preemption) resets
    # num_computed_tokens to 0 and vLLM asks again: the producer already let the KV go.
    assert s.get_num_new_matched_tokens(req, 0) == (0, False)
    s.update_state_after_alloc(req, [30, 31, 32], 0)
    req.status = RequestStatus.FINISHED_STOPPED
    assert s.request_finished(req, [30, 31, 32]) == (False, None)
    assert s.build_meta({}).empty()
    assert not s.has_pending_push_work()


def test_heartbeats_name_waiting_transfers_per_producer() -> None:
    clock = Clock()
    s = sched(clock=clock)
    s.get_num_new_matched_tokens(consume("r1", "t1"), 0)
    s.get_num_new_matched_tokens(consume("r2", "t2"), 0)
    assert s.build_meta({}).heartbeats == {}
    clock.t += s.settings.heartbeat_s
    assert s.build_meta({}).heartbeats == {PRODUCER: ["t1", "t2"]}
    assert s.build_meta({}).heartbeats == {}  # not again before another interval


# -- producer ------------------------------------------------------------------------------


def test_produce_sends_only_on_the_final_prefill_step() -> None:
    s = sched()
    req = produce()
    assert s.get_num_new_matched_tokens(req, 0) == (0, False)
    s.update_state_after_alloc(req, [21, 22, 23], 0)
    assert s.build_meta({"p1": 4}).sends == []
    req.num_computed_tokens = 4
    assert s.build_meta({"other": 6}).sends == []  # not scheduled this step
    assert s.build_meta({"p1": 6}).sends == [SendReq("p1", "t1", [21, 22, 23], PROMPT)]
    req.num_computed_tokens = PROMPT
    assert s.build_meta({"p1": 1}).sends == []  # decode steps


def test_produce_finished_returns_decode_params_and_holds_blocks() -> None:
    s = sched()
    req = produce()
    run_prefill(s, req)
    req.status = RequestStatus.FINISHED_LENGTH_CAPPED
    held, params = s.request_finished(req, [21, 22, 23])
    assert held is True
    assert params == {"pdfabric": "consume", "transfer_id": "t1", "producer": "10.0.0.7:8101", "num_tokens": PROMPT}
    assert s.has_pending_push_work()
    assert s.build_meta({}).finished_sends == [FinishedSend("p1", "t1", False, True)]
    assert s.has_pending_push_work()  # still held
    s.transfers_finished({"p1"}, None)
    assert not s.has_pending_push_work()


def test_produce_params_bracket_an_ipv6_advertise_host() -> None:
    s = sched(extra={"control_port": 8101, "advertise_host": "::1"})
    req = produce()
    run_prefill(s, req)
    req.status = RequestStatus.FINISHED_STOPPED
    _, params = s.request_finished(req, [21, 22, 23])
    assert params is not None and params["producer"] == "[::1]:8101"


@pytest.mark.parametrize("blocks, held", [([21, 22, 23], True), ([], False)])
def test_aborted_produce_returns_no_params(blocks: list[int], held: bool) -> None:
    s = sched()
    req = produce()
    s.update_state_after_alloc(req, [21, 22, 23], 0)
    req.status = RequestStatus.FINISHED_ABORTED
    assert s.request_finished(req, blocks) == (held, None)
    assert s.build_meta({}).finished_sends == [FinishedSend("p1", "t1", True, held)]
    assert s.has_pending_push_work() is held
    s.transfers_finished({"p1"} if held else None, None)
    assert not s.has_pending_push_work()


def test_produce_without_control_port_returns_no_params() -> None:
    s = sched(extra={})
    req = produce()
    run_prefill(s, req)
    req.status = RequestStatus.FINISHED_STOPPED
    assert s.request_finished(req, [21, 22, 23]) == (True, None)


def test_request_without_pdfabric_params_is_left_alone() -> None:
    s = sched()
    req = Req("x", {"do_remote_prefill": True})
    assert s.get_num_new_matched_tokens(req, 0) == (0, False)
    s.update_state_after_alloc(req, [1, 2, 3], 0)
    req.status = RequestStatus.FINISHED_STOPPED
    assert s.request_finished(req, [1, 2, 3]) == (False, None)
    assert s.build_meta({"x": 10}).empty()
    assert sum(s.counters.values()) == 0


# -- refusals ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "params",
    [{"pdfabric": "consume", "transfer_id": "t 1", "producer": PRODUCER},
     {"pdfabric": "consume", "transfer_id": "t1", "producer": "nowhere"},
     {"pdfabric": "produce", "transfer_id": "t1", "extra": 1}],
)
def test_bad_params_are_counted_once_and_run_without_transfer(params: dict[str, Any]) -> None:
    s = sched()
    req = Req("r1", params)
    assert s.get_num_new_matched_tokens(req, 0) == (0, False)
    s.update_state_after_alloc(req, [10, 11, 12], 0)
    assert s.build_meta({"r1": PROMPT}).empty()
    req.status = RequestStatus.FINISHED_STOPPED
    assert s.request_finished(req, [10, 11, 12]) == (False, None)
    assert s.counters["bad_params"] == 1
    assert s.build_meta({}).empty()


@pytest.mark.parametrize("req, producer, consumer", [(produce(), False, True), (consume(), True, False)])
def test_wrong_role_is_counted_and_runs_without_transfer(req: Req, producer: bool, consumer: bool) -> None:
    s = sched(producer=producer, consumer=consumer)
    assert s.get_num_new_matched_tokens(req, 0) == (0, False)
    s.update_state_after_alloc(req, [10, 11, 12], 0)
    assert s.build_meta({req.request_id: PROMPT}).empty()
    req.status = RequestStatus.FINISHED_STOPPED
    assert s.request_finished(req, [10, 11, 12]) == (False, None)
    assert s.counters["wrong_role"] == 1
