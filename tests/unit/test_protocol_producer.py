"""ProducerTable: the producer's pure transfer state machine (Rules 1-5 of its docstring).

Every scenario ends with a leak check: no open transfer, no held request."""

from __future__ import annotations

from collections import Counter

import pytest

from pdfabric.protocol.messages import Grant
from pdfabric.protocol.producer import ProducerAction, ProducerTable, PushLayers, Release, SendAbort

LAYERS, BLOCK, LEASE, WAIT = 3, 4, 10.0, 5.0
PROMPT = 10  # tokens -> 3 blocks of 4
PEER = "decode-0"


def table() -> ProducerTable:
    return ProducerTable(num_layers=LAYERS, block_size=BLOCK, lease_s=LEASE, grant_wait_s=WAIT)


def grant(tid: str = "t1", *, blocks: list[int] | None = None, first: int = 0, tokens: int = PROMPT) -> Grant:
    return Grant(tid, PEER, [7, 8, 9] if blocks is None else blocks, first, tokens, 30.0)


def compute(t: ProducerTable, tid: str = "t1", req: str = "r1", now: float = 0.0) -> list[ProducerAction]:
    """One final prefill step of the whole prompt: schedule, save every layer, finish the step."""
    out = t.scheduled(req, tid, [1, 2, 3], PROMPT, PROMPT, now)
    for layer in range(LAYERS):
        out += t.layer_saved(layer)
    return out + t.step_done()


def pushed_layers(actions: list[ProducerAction], tid: str = "t1") -> Counter[int]:
    return Counter(layer for a in actions if isinstance(a, PushLayers) and a.transfer_id == tid for layer in a.layers)


def land_all(t: ProducerTable, tid: str = "t1", error: str | None = None) -> list[ProducerAction]:
    out: list[ProducerAction] = []
    for layer in range(LAYERS):
        out += t.push_result(tid, layer, error)
    return out


def aborts(actions: list[ProducerAction]) -> list[SendAbort]:
    return [a for a in actions if isinstance(a, SendAbort)]


def releases(actions: list[ProducerAction]) -> list[Release]:
    return [a for a in actions if isinstance(a, Release)]


def assert_drained(t: ProducerTable) -> None:
    assert t.open_transfers() == []
    assert t.held_requests() == []
    assert t._by_req == {}


def test_grant_before_compute_pushes_each_layer_once_during_the_step() -> None:
    t = table()
    assert t.granted(grant(), PEER, 0.0) == []
    assert t.scheduled("r1", "t1", [1, 2, 3], PROMPT, PROMPT, 0.0) == []
    per_layer = [t.layer_saved(layer) for layer in range(LAYERS)]
    assert per_layer == [[PushLayers("t1", (layer,))] for layer in range(LAYERS)]
    assert t.step_done() == []  # nothing left to push
    assert land_all(t) == []  # engine still owns the blocks (Rule 2)
    assert t.counters["transfers_pushed"] == 1
    assert t.finished("r1", "t1", aborted=False, held=True, now=1.0) == [Release("r1", "t1")]
    assert_drained(t)


def test_compute_before_grant_pushes_every_layer_once_on_grant() -> None:
    t = table()
    assert compute(t) == []
    assert t.finished("r1", "t1", aborted=False, held=True, now=1.0) == []
    assert t.held_requests() == ["r1"]
    out = t.granted(grant(), PEER, 2.0)
    assert out == [PushLayers("t1", (0, 1, 2))]
    assert land_all(t) == [Release("r1", "t1")]
    assert t.counters["layers_pushed"] == LAYERS and t.counters["grants"] == 1
    assert_drained(t)


def test_grant_in_the_middle_of_the_final_step_pushes_missed_layers_at_step_done() -> None:
    t = table()
    out = t.scheduled("r1", "t1", [1, 2, 3], PROMPT, PROMPT, 0.0) + t.layer_saved(0)
    out += t.granted(grant(), PEER, 0.0)  # layer 0 saved before the grant came
    out += t.layer_saved(1) + t.layer_saved(2)
    rest = t.step_done()
    assert rest == [PushLayers("t1", (0,))]
    assert pushed_layers(out + rest) == Counter({0: 1, 1: 1, 2: 1})
    assert land_all(t) == []
    assert t.finished("r1", "t1", aborted=False, held=True, now=1.0) == [Release("r1", "t1")]
    assert_drained(t)


def test_layer_saved_twice_pushes_once() -> None:
    t = table()
    t.granted(grant(), PEER, 0.0)
    t.scheduled("r1", "t1", [1, 2, 3], PROMPT, PROMPT, 0.0)
    assert t.layer_saved(0) == [PushLayers("t1", (0,))]
    assert t.layer_saved(0) == []
    assert t.step_done() == [PushLayers("t1", (1, 2))]
    land_all(t)
    assert t.finished("r1", "t1", False, True, 1.0) == [Release("r1", "t1")]
    assert_drained(t)


def test_chunked_prefill_pushes_nothing_before_the_final_step() -> None:
    t = table()
    t.granted(grant(), PEER, 0.0)
    out = t.scheduled("r1", "t1", [1, 2, 3], PROMPT, 4, 0.0)  # first chunk: 4 of 10 tokens
    out += [a for layer in range(LAYERS) for a in t.layer_saved(layer)] + t.step_done()
    assert out == []
    out = compute(t, now=0.5)  # second chunk completes the prompt
    assert pushed_layers(out) == Counter({0: 1, 1: 1, 2: 1})
    land_all(t)
    assert t.finished("r1", "t1", aborted=False, held=True, now=1.0) == [Release("r1", "t1")]
    assert_drained(t)


def test_two_transfers_in_one_step_each_push_their_own_layers() -> None:
    t = table()
    t.granted(grant("a"), PEER, 0.0)
    t.granted(grant("b"), PEER, 0.0)
    t.scheduled("ra", "a", [1, 2, 3], PROMPT, PROMPT, 0.0)
    t.scheduled("rb", "b", [4, 5, 6], PROMPT, PROMPT, 0.0)
    out = [a for layer in range(LAYERS) for a in t.layer_saved(layer)] + t.step_done()
    assert pushed_layers(out, "a") == pushed_layers(out, "b") == Counter({0: 1, 1: 1, 2: 1})
    land_all(t, "a")
    land_all(t, "b")
    assert t.finished("ra", "a", False, True, 1.0) + t.finished("rb", "b", False, True, 1.0) == [
        Release("ra", "a"), Release("rb", "b")]
    assert_drained(t)


def test_grant_with_local_prefix_hit_on_the_consumer_is_accepted() -> None:
    t = table()
    compute(t)
    t.finished("r1", "t1", False, True, 0.0)
    assert t.granted(grant(blocks=[8, 9], first=1), PEER, 0.0) == [PushLayers("t1", (0, 1, 2))]
    assert land_all(t) == [Release("r1", "t1")]
    assert_drained(t)


def test_release_waits_for_in_flight_writes_after_finished() -> None:
    t = table()
    t.granted(grant(), PEER, 0.0)
    compute(t)
    assert t.finished("r1", "t1", False, True, 1.0) == []
    assert t.held_requests() == ["r1"]
    assert t.push_result("t1", 0, None) == [] and t.push_result("t1", 1, None) == []
    assert t.push_result("t1", 2, None) == [Release("r1", "t1")]
    assert_drained(t)


def test_duplicate_and_unknown_push_results_are_ignored() -> None:
    t = table()
    t.granted(grant(), PEER, 0.0)
    compute(t)
    t.finished("r1", "t1", False, True, 1.0)
    assert t.push_result("t1", 0, None) == []
    assert t.push_result("t1", 0, None) == []  # same layer twice
    assert t.push_result("nope", 0, None) == []
    assert t.counters["layers_pushed"] == 1
    assert t.push_result("t1", 1, None) + t.push_result("t1", 2, None) == [Release("r1", "t1")]
    assert_drained(t)


def test_not_held_request_is_never_released() -> None:
    t = table()
    compute(t)
    assert t.finished("r1", "t1", aborted=False, held=False, now=1.0) == []
    assert_drained(t)


def test_not_held_request_with_grant_tells_the_consumer() -> None:
    t = table()
    t.granted(grant(), PEER, 0.0)
    t.scheduled("r1", "t1", [1, 2, 3], PROMPT, 4, 0.0)
    out = t.finished("r1", "t1", aborted=False, held=False, now=1.0)
    assert releases(out) == []
    assert [a.peer for a in aborts(out)] == [PEER]
    assert_drained(t)


def test_finished_without_any_event_releases_if_held() -> None:
    t = table()
    assert t.finished("r1", "t1", False, True, 0.0) == [Release("r1", "t1")]
    assert t.finished("r2", "t2", False, False, 0.0) == []
    assert_drained(t)


def test_lease_expiry_releases_held_blocks_and_counts() -> None:
    t = table()
    compute(t)
    t.finished("r1", "t1", False, True, 0.0)
    assert t.tick(LEASE - 0.1) == []
    assert t.tick(LEASE) == [Release("r1", "t1")]
    assert t.counters["lease_expired"] == 1
    assert_drained(t)


def test_heartbeat_extends_the_lease() -> None:
    t = table()
    compute(t)
    t.finished("r1", "t1", False, True, 0.0)
    t.heartbeat(["t1", "unknown"], 8.0)
    assert t.tick(LEASE + 1.0) == []
    assert t.held_requests() == ["r1"]
    assert t.tick(8.0 + LEASE) == [Release("r1", "t1")]
    assert_drained(t)


def test_lease_expiry_with_a_grant_tells_the_consumer() -> None:
    t = table()
    t.scheduled("r1", "t1", [1, 2, 3], PROMPT, 4, 0.0)  # KV never completed
    t.granted(grant(), PEER, 0.0)
    t.finished("r1", "t1", aborted=False, held=True, now=0.0)
    out = t.tick(LEASE)
    assert [(a.peer, a.transfer_id) for a in aborts(out)] == [(PEER, "t1")]
    assert "lease expired" in aborts(out)[0].reason
    assert releases(out) == [Release("r1", "t1")]
    assert_drained(t)


def test_late_grant_after_lease_expiry_gets_a_clear_abort() -> None:
    t = table()
    compute(t)
    t.finished("r1", "t1", False, True, 0.0)
    t.tick(LEASE)
    out = t.granted(grant(), PEER, LEASE + 1)
    assert len(out) == 1 and isinstance(out[0], SendAbort)
    assert "already ended" in out[0].reason and "lease expired" in out[0].reason
    assert t.counters["late_grants"] == 1
    assert_drained(t)


def test_late_grant_after_a_completed_transfer_gets_an_abort() -> None:
    t = table()
    t.granted(grant(), PEER, 0.0)
    compute(t)
    land_all(t)
    t.finished("r1", "t1", False, True, 1.0)
    out = t.granted(grant(), "decode-1", 2.0)
    assert [(a.peer, a.transfer_id) for a in aborts(out)] == [("decode-1", "t1")]
    assert "already ended" in out[0].reason  # type: ignore[union-attr]
    assert_drained(t)


def test_unknown_grant_expires_with_an_abort() -> None:
    t = table()
    assert t.granted(grant(), PEER, 0.0) == []
    assert t.tick(WAIT - 0.1) == []
    out = t.tick(WAIT)
    assert len(out) == 1 and isinstance(out[0], SendAbort) and out[0].peer == PEER
    assert f"{WAIT:g}s" in out[0].reason
    assert t.counters["unknown_grants"] == 1
    assert_drained(t)


def test_request_arriving_after_unknown_grant_expired_is_released_at_finish() -> None:
    t = table()
    t.granted(grant(), PEER, 0.0)
    t.tick(WAIT)  # the consumer was told to give up on t1
    assert compute(t, now=6.0) == []  # nothing to push, and no lease to wait out
    assert t.counters["ended_before_prefill"] == 1
    assert t.finished("r1", "t1", False, True, 6.0) == [Release("r1", "t1")]
    assert_drained(t)


def test_consumer_abort_before_the_request_arrives_releases_it_at_finish() -> None:
    t = table()
    assert t.remote_abort("t1", "client went away") == []
    assert compute(t) == []
    assert t.granted(grant(), PEER, 1.0)[0].reason.startswith("transfer already ended on the producer")
    assert t.finished("r1", "t1", False, True, 1.0) == [Release("r1", "t1")]
    assert_drained(t)


def test_duplicate_grant_is_refused_and_first_one_served() -> None:
    t = table()
    t.granted(grant(), PEER, 0.0)
    out = t.granted(grant(), "decode-1", 0.0)
    assert [(a.peer, a.transfer_id) for a in aborts(out)] == [("decode-1", "t1")]
    assert t.counters["duplicate_grants"] == 1
    assert pushed_layers(compute(t)) == Counter({0: 1, 1: 1, 2: 1})
    land_all(t)
    assert t.finished("r1", "t1", False, True, 1.0) == [Release("r1", "t1")]
    assert_drained(t)


@pytest.mark.parametrize(
    "bad",
    [grant(tokens=PROMPT + 1), grant(blocks=[7, 8]), grant(blocks=[7, 8, 9, 10]), grant(blocks=[8, 9], first=2)],
    ids=["num_tokens", "too-few-blocks", "too-many-blocks", "first_block"],
)
def test_mismatched_grant_after_finish_aborts_and_releases(bad: Grant) -> None:
    t = table()
    compute(t)
    t.finished("r1", "t1", False, True, 0.0)
    out = t.granted(bad, PEER, 1.0)
    assert [a.peer for a in aborts(out)] == [PEER] and "does not match" in aborts(out)[0].reason
    assert releases(out) == [Release("r1", "t1")]
    assert pushed_layers(out) == Counter()
    assert t.counters["mismatched_grants"] == 1
    assert_drained(t)


def test_mismatched_grant_before_the_request_aborts_and_releases_on_finish() -> None:
    t = table()
    t.granted(grant(tokens=PROMPT + 1), PEER, 0.0)
    out = compute(t)
    assert len(aborts(out)) == 1 and pushed_layers(out) == Counter()
    assert t.finished("r1", "t1", False, True, 1.0) == [Release("r1", "t1")]
    assert_drained(t)


def test_local_abort_with_grant_tells_the_consumer_and_releases() -> None:
    t = table()
    t.granted(grant(), PEER, 0.0)
    t.scheduled("r1", "t1", [1, 2, 3], PROMPT, 4, 0.0)
    out = t.finished("r1", "t1", aborted=True, held=True, now=1.0)
    assert [(a.peer, a.transfer_id) for a in aborts(out)] == [(PEER, "t1")]
    assert "aborted" in aborts(out)[0].reason
    assert releases(out) == [Release("r1", "t1")]
    assert t.counters["local_aborts"] == 1
    assert_drained(t)


def test_local_abort_with_writes_in_flight_releases_after_they_land() -> None:
    t = table()
    t.granted(grant(), PEER, 0.0)
    compute(t)
    t.push_result("t1", 0, None)
    out = t.finished("r1", "t1", aborted=True, held=True, now=1.0)
    assert len(aborts(out)) == 1 and releases(out) == []
    assert t.push_result("t1", 1, None) == []
    assert t.push_result("t1", 2, None) == [Release("r1", "t1")]
    assert t.counters["transfers_pushed"] == 0
    assert_drained(t)


def test_local_abort_without_grant_answers_a_late_grant() -> None:
    t = table()
    t.scheduled("r1", "t1", [1, 2, 3], PROMPT, 4, 0.0)
    assert t.finished("r1", "t1", aborted=True, held=True, now=1.0) == [Release("r1", "t1")]
    out = t.granted(grant(), PEER, 2.0)
    assert len(aborts(out)) == 1 and "aborted" in aborts(out)[0].reason
    assert_drained(t)


def test_push_failure_aborts_once_and_releases_after_writes_land() -> None:
    t = table()
    t.granted(grant(), PEER, 0.0)
    compute(t)
    t.finished("r1", "t1", False, True, 1.0)
    out = t.push_result("t1", 1, "connection reset")
    assert out == [SendAbort(PEER, "t1", "push of layer 1 failed: connection reset")]
    assert t.push_result("t1", 0, "connection reset") == []  # told once
    assert t.push_result("t1", 2, None) == [Release("r1", "t1")]
    assert t.counters["push_failures"] == 2 and t.counters["transfers_pushed"] == 0
    assert_drained(t)


def test_remote_abort_stops_further_pushes() -> None:
    t = table()
    t.granted(grant(), PEER, 0.0)
    t.scheduled("r1", "t1", [1, 2, 3], PROMPT, PROMPT, 0.0)
    assert t.layer_saved(0) == [PushLayers("t1", (0,))]
    assert t.remote_abort("t1", "decode request aborted") == []
    assert t.layer_saved(1) + t.layer_saved(2) + t.step_done() == []
    assert t.push_result("t1", 0, None) == []
    assert t.finished("r1", "t1", False, True, 1.0) == [Release("r1", "t1")]
    assert t.counters["remote_aborts"] == 1
    assert_drained(t)


def test_remote_abort_of_a_held_request_releases_it_now() -> None:
    t = table()
    compute(t)
    t.finished("r1", "t1", False, True, 0.0)
    assert t.remote_abort("t1", "gave up") == [Release("r1", "t1")]
    assert t.remote_abort("t1", "again") == []
    assert_drained(t)


def test_drop_all_aborts_granted_and_releases_held() -> None:
    t = table()
    t.granted(grant("a"), PEER, 0.0)  # granted, pushes in flight
    compute(t, "a", "ra")
    t.finished("ra", "a", False, True, 0.0)
    compute(t, "b", "rb")  # held, no grant
    t.finished("rb", "b", False, True, 0.0)
    t.granted(grant("c"), "decode-1", 0.0)  # grant with no request
    out = t.drop_all("producer shutting down")
    assert sorted((a.peer, a.transfer_id, a.reason) for a in aborts(out)) == [
        (PEER, "a", "producer shutting down"), ("decode-1", "c", "producer shutting down")]
    assert sorted(releases(out), key=lambda r: r.request_id) == [Release("ra", "a"), Release("rb", "b")]
    assert t.push_result("a", 0, None) == []
    assert_drained(t)
