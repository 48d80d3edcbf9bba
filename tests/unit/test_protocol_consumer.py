"""ConsumerTable: the consumer's pure transfer state machine (Rules 1-4 of its docstring).

Every scenario ends with a leak check: no open transfer, no request mapping left."""

from __future__ import annotations

import pytest

from pdfabric.protocol.consumer import ConsumerAction, ConsumerTable, Finish, Revoke, SendAbort, SendGrant
from pdfabric.protocol.messages import Grant

LAYERS, TIMEOUT = 3, 30.0
PRODUCER = "127.0.0.1:8101"


def table() -> ConsumerTable:
    return ConsumerTable(num_layers=LAYERS, engine="decode-0", timeout_s=TIMEOUT)


def request(t: ConsumerTable, tid: str = "t1", req: str = "r1", now: float = 0.0) -> list[ConsumerAction]:
    return t.requested(req, tid, PRODUCER, [7, 8], 1, 10, now)


def assert_drained(t: ConsumerTable) -> None:
    assert t.open_transfers() == []
    assert t._by_req == {}


def kinds(actions: list[ConsumerAction]) -> list[str]:
    return [type(a).__name__ for a in actions]


def test_requested_sends_a_grant_for_the_blocks() -> None:
    t = table()
    out = request(t)
    assert out == [SendGrant(PRODUCER, Grant("t1", "decode-0", [7, 8], 1, 10, TIMEOUT))]
    assert t.open_transfers() == ["t1"]
    assert t.by_request("r1") is t.get("t1")
    assert t.counters["grants"] == 1
    t.drop_all("test over")
    assert_drained(t)


def test_all_layers_landed_finishes_ok_once() -> None:
    t = table()
    request(t)
    assert t.layer_landed("t1", 0, 100) == []
    assert t.layer_landed("t1", 0, 100) == []  # a duplicate notification counts once
    assert t.layer_landed("t1", 2, 100) == []
    recv = t.get("t1")
    assert recv is not None and recv.nbytes == 200
    assert t.layer_landed("t1", 1, 100) == [Finish("r1", "t1", True)]
    assert t.layer_landed("t1", 1, 100) == []
    assert t.counters["transfers_received"] == 1
    assert_drained(t)


def test_landed_for_unknown_transfer_is_ignored() -> None:
    t = table()
    assert t.layer_landed("nope", 0, 1) == []
    assert_drained(t)


def test_failure_revokes_open_layers_then_aborts_then_finishes() -> None:
    t = table()
    request(t)
    t.layer_landed("t1", 1, 100)
    out = t.failed("t1", "layer 0 write refused")
    assert out == [
        Revoke("t1", (0, 2)),
        SendAbort(PRODUCER, "t1", "layer 0 write refused"),
        Finish("r1", "t1", False, "layer 0 write refused"),
    ]
    assert t.failed("t1", "again") == []
    assert t.counters["transfers_failed"] == 1
    assert_drained(t)


def test_timeout_fails_with_a_reason_naming_it() -> None:
    t = table()
    request(t, now=5.0)
    t.layer_landed("t1", 0, 100)
    assert t.tick(5.0 + TIMEOUT - 0.1) == []
    out = t.tick(5.0 + TIMEOUT)
    assert kinds(out) == ["Revoke", "SendAbort", "Finish"]
    revoke, abort, finish = out
    assert isinstance(revoke, Revoke) and revoke.layers == (1, 2)
    assert isinstance(abort, SendAbort) and abort.producer == PRODUCER
    assert isinstance(finish, Finish) and not finish.ok and not finish.aborted
    assert "timed out" in finish.reason and f"{TIMEOUT:g}s" in finish.reason
    assert "1 of 3 layers" in finish.reason
    assert t.counters["timeouts"] == 1
    assert_drained(t)


def test_tick_expires_only_overdue_transfers() -> None:
    t = table()
    request(t, "a", "ra", now=0.0)
    request(t, "b", "rb", now=10.0)
    out = t.tick(TIMEOUT)
    assert [a.transfer_id for a in out if isinstance(a, Finish)] == ["a"]
    assert t.open_transfers() == ["b"]
    assert kinds(t.tick(10.0 + TIMEOUT)) == ["Revoke", "SendAbort", "Finish"]
    assert_drained(t)


def test_remote_abort_fails_without_telling_the_producer() -> None:
    t = table()
    request(t)
    out = t.remote_abort("t1", "lease expired")
    assert kinds(out) == ["Revoke", "Finish"]
    assert out[0] == Revoke("t1", (0, 1, 2))
    finish = out[1]
    assert isinstance(finish, Finish) and not finish.ok and "the producer aborted: lease expired" in finish.reason
    assert t.counters["remote_aborts"] == 1
    assert_drained(t)


def test_remote_abort_of_unknown_transfer_is_ignored() -> None:
    t = table()
    request(t)
    t.layer_landed("t1", 0, 1)
    t.layer_landed("t1", 1, 1)
    t.layer_landed("t1", 2, 1)
    assert t.remote_abort("t1", "too late") == []
    assert t.counters["remote_aborts"] == 0
    assert_drained(t)


def test_local_abort_revokes_tells_producer_and_finishes_aborted() -> None:
    t = table()
    request(t)
    t.layer_landed("t1", 2, 100)
    out = t.local_abort("r1")
    assert kinds(out) == ["Revoke", "SendAbort", "Finish"]
    assert out[0] == Revoke("t1", (0, 1))
    assert isinstance(out[1], SendAbort) and out[1].producer == PRODUCER
    finish = out[2]
    assert isinstance(finish, Finish) and finish.ok and finish.aborted and finish.request_id == "r1"
    assert t.local_abort("r1") == []
    assert t.counters["local_aborts"] == 1
    assert_drained(t)


def test_duplicate_transfer_id_fails_the_second_request_only() -> None:
    t = table()
    request(t, "t1", "r1")
    out = request(t, "t1", "r2")
    assert len(out) == 1 and isinstance(out[0], Finish)
    assert out[0].request_id == "r2" and not out[0].ok and "already in use" in out[0].reason
    assert t.counters["duplicate_transfer_ids"] == 1
    assert t.by_request("r2") is None
    recv = t.by_request("r1")
    assert recv is not None and recv.tid == "t1"
    for layer in range(LAYERS):
        out = t.layer_landed("t1", layer, 1)
    assert out == [Finish("r1", "t1", True)]
    assert_drained(t)


def test_transfer_id_is_reusable_after_the_transfer_ended() -> None:
    t = table()
    request(t)
    t.local_abort("r1")
    assert kinds(request(t, "t1", "r2")) == ["SendGrant"]
    t.drop_all("test over")
    assert_drained(t)


@pytest.mark.parametrize("n", [0, 2])
def test_drop_all_fails_every_open_transfer(n: int) -> None:
    t = table()
    for i in range(n):
        request(t, f"t{i}", f"r{i}")
    out = t.drop_all("consumer shutting down")
    finishes = [a for a in out if isinstance(a, Finish)]
    assert sorted(f.request_id for f in finishes) == [f"r{i}" for i in range(n)]
    assert all(not f.ok and f.reason == "consumer shutting down" for f in finishes)
    assert len([a for a in out if isinstance(a, SendAbort)]) == n
    assert_drained(t)
