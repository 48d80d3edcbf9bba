"""``parse_params``: pdfabric's part of ``kv_transfer_params``, refused loudly when malformed."""

from __future__ import annotations

from typing import Any

import pytest

from pdfabric.connector.params import (
    MAX_TRANSFER_ID,
    Consume,
    Produce,
    RecvReq,
    StepMeta,
    consume_params,
    parse_params,
)
from pdfabric.errors import ConfigError


def refused(params: Any) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_params(params)
    return info.value


@pytest.mark.parametrize("params", [None, {}, {"do_remote_decode": True}, {"transfer_id": "t-1"}])
def test_params_without_pdfabric_key_are_not_ours(params: Any) -> None:
    assert parse_params(params) is None


def test_produce() -> None:
    assert parse_params({"pdfabric": "produce", "transfer_id": "t-42"}) == Produce("t-42")


def test_consume_with_and_without_num_tokens() -> None:
    base = {"pdfabric": "consume", "transfer_id": "t-42", "producer": "127.0.0.1:8101"}
    assert parse_params(base) == Consume("t-42", "127.0.0.1:8101", None)
    assert parse_params({**base, "num_tokens": 17}) == Consume("t-42", "127.0.0.1:8101", 17)


@pytest.mark.parametrize("producer", ["prefill-0.example:8101", "[::1]:8101", "10.0.0.2:1", "h:65535"])
def test_consume_accepts_host_names_and_ipv6(producer: str) -> None:
    p = parse_params({"pdfabric": "consume", "transfer_id": "t", "producer": producer})
    assert isinstance(p, Consume) and p.producer == producer


def test_consume_params_round_trip() -> None:
    params = consume_params("t-9", "[::1]:8101", 33)
    assert parse_params(params) == Consume("t-9", "[::1]:8101", 33)


@pytest.mark.parametrize("tid", ["a", "A-z_0.9:x@y/z+w=v", "x" * MAX_TRANSFER_ID])
def test_transfer_id_accepted(tid: str) -> None:
    assert parse_params({"pdfabric": "produce", "transfer_id": tid}) == Produce(tid)


@pytest.mark.parametrize(
    "tid",
    [None, "", "x" * (MAX_TRANSFER_ID + 1), "t 1", "t#1", "t\n", "tränsfer", 42, ["t"]],
    ids=["missing", "empty", "too-long", "space", "hash", "newline", "non-ascii", "int", "list"],
)
def test_bad_transfer_id_names_the_field(tid: Any) -> None:
    params = {"pdfabric": "produce"} if tid is None else {"pdfabric": "produce", "transfer_id": tid}
    err = refused(params)
    assert err.path == "kv_transfer_params.transfer_id"
    assert "kv_transfer_params.transfer_id" in str(err)


def test_hash_is_refused_because_it_separates_layer_ids() -> None:
    # sub_transfer_id() appends "#<layer>": a '#' in the id would make them ambiguous.
    assert refused({"pdfabric": "produce", "transfer_id": "a#1"}).path == "kv_transfer_params.transfer_id"


@pytest.mark.parametrize(
    "params, key",
    [
        ({"pdfabric": "produce", "transfer_id": "t", "producer": "h:1"}, "producer"),
        ({"pdfabric": "produce", "transfer_id": "t", "num_tokens": 3}, "num_tokens"),
        ({"pdfabric": "consume", "transfer_id": "t", "producer": "h:1", "prodcuer": "h:2"}, "prodcuer"),
    ],
)
def test_unknown_key_is_refused_and_named(params: dict[str, Any], key: str) -> None:
    err = refused(params)
    assert err.path == f"kv_transfer_params.{key}"
    assert repr(key) in str(err)


@pytest.mark.parametrize("mode", ["push", "PRODUCE", "", None, 1])
def test_bad_mode_is_refused(mode: Any) -> None:
    err = refused({"pdfabric": mode, "transfer_id": "t"})
    assert err.path == "kv_transfer_params.pdfabric"
    assert "'produce' or 'consume'" in str(err)


@pytest.mark.parametrize(
    "producer",
    [None, "", "127.0.0.1", "127.0.0.1:", ":8101", "h:0", "h:65536", "h:123456", "h:80 ", "tcp://h:80",
     "h h:80", "[zz]:80", "h:\uff18\uff11\uff10\uff11", 8101],
)
def test_bad_producer_address_is_refused(producer: Any) -> None:
    params = {"pdfabric": "consume", "transfer_id": "t"}
    if producer is not None:
        params["producer"] = producer
    err = refused(params)
    assert err.path == "kv_transfer_params.producer"


@pytest.mark.parametrize("n", [0, -1, True, 1.5, "10"])
def test_bad_num_tokens_is_refused(n: Any) -> None:
    err = refused({"pdfabric": "consume", "transfer_id": "t", "producer": "h:1", "num_tokens": n})
    assert err.path == "kv_transfer_params.num_tokens"


@pytest.mark.parametrize("params", [["pdfabric"], "pdfabric"])
def test_non_mapping_with_pdfabric_is_refused(params: Any) -> None:
    assert refused(params).path == "kv_transfer_params"


def test_step_meta_empty() -> None:
    meta = StepMeta()
    assert meta.empty()
    meta.recvs.append(RecvReq("r", "t", "h:1", [1], 0, 4))
    assert not meta.empty()
    assert not StepMeta(heartbeats={"h:1": ["t"]}).empty()
    assert not StepMeta(unsent_aborts=[("h:1", "t", "why")]).empty()
