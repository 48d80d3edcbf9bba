"""Control-plane messages: tagged msgpack round trips, strict decoding, Done notifications."""

from __future__ import annotations

import msgspec
import pytest

from pdfabric.errors import FabricError
from pdfabric.protocol.messages import (
    WIRE_VERSION,
    Abort,
    Done,
    Grant,
    Heartbeat,
    Hello,
    HelloOk,
    LayoutInfo,
    ProtocolError,
    Refuse,
    Status,
    StatusReply,
    decode,
    decode_done,
    encode,
    sub_transfer_id,
)

LAYOUT = LayoutInfo(geometry={"dtype": "bf16", "layers": 2}, layer_addrs=[4096, 8192], block_stride=512, segment_stride=0)

SAMPLES = [
    Hello(WIRE_VERSION, "decode-0", {"model": "tiny", "block_size": 32}, LAYOUT, b"\x00\x01peer"),
    HelloOk("prefill-0", {"model": "tiny", "block_size": 32}, "a" * 32),
    Refuse("fingerprint differs: block_size 16 != 32"),
    Grant("t-1", "decode-0", [3, 4, 5], 1, 100, 30.0),
    Abort("t-1", "timed out"),
    Heartbeat(["t-1", "t-2"]),
    Heartbeat([]),
    Status(),
    StatusReply("producer", "prefill-0", {"grants": 3}, ["t-9"]),
]


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip_keeps_type_and_fields(msg: object) -> None:
    back = decode(encode(msg))  # type: ignore[arg-type]
    assert type(back) is type(msg)
    assert back == msg


def test_messages_are_tagged_by_class_name() -> None:
    raw = msgspec.msgpack.decode(encode(Abort("t-1", "why")))
    assert raw == {"type": "Abort", "transfer_id": "t-1", "reason": "why", "rehello": False}


def test_protocol_error_is_a_fabric_error() -> None:
    assert issubclass(ProtocolError, FabricError)


@pytest.mark.parametrize(
    "data",
    [b"", b"\xc1", b"not msgpack at all \xff\xfe", msgspec.msgpack.encode([1, 2, 3]), msgspec.msgpack.encode("Abort")],
    ids=["empty", "reserved-byte", "garbage", "array", "string"],
)
def test_garbage_is_a_protocol_error(data: bytes) -> None:
    with pytest.raises(ProtocolError, match="unreadable control message"):
        decode(data)


def test_unknown_tag_is_refused() -> None:
    data = msgspec.msgpack.encode({"type": "Launch", "transfer_id": "t-1"})
    with pytest.raises(ProtocolError, match="Launch"):
        decode(data)


def test_missing_tag_is_refused() -> None:
    with pytest.raises(ProtocolError):
        decode(msgspec.msgpack.encode({"transfer_id": "t-1", "reason": "x"}))


def test_unknown_field_is_refused_and_named() -> None:
    data = msgspec.msgpack.encode({"type": "Abort", "transfer_id": "t-1", "reason": "x", "evil": 1})
    with pytest.raises(ProtocolError, match="evil"):
        decode(data)


def test_wrong_type_is_refused_and_located() -> None:
    data = msgspec.msgpack.encode(
        {"type": "Grant", "transfer_id": "t-1", "engine": "d", "blocks": ["3"], "first_block": 0,
         "num_tokens": 10, "timeout_s": 1.0}
    )
    with pytest.raises(ProtocolError, match=r"blocks\[0\]"):
        decode(data)


def test_missing_field_is_refused_and_named() -> None:
    data = msgspec.msgpack.encode({"type": "Abort", "transfer_id": "t-1"})
    with pytest.raises(ProtocolError, match="reason"):
        decode(data)


def test_nested_layout_refuses_unknown_fields() -> None:
    good = msgspec.msgpack.decode(encode(SAMPLES[0]))
    good["layout"]["extra"] = 1
    with pytest.raises(ProtocolError, match="extra"):
        decode(msgspec.msgpack.encode(good))


def test_done_round_trip_is_compact_array() -> None:
    done = Done("t-1", 3, 4096)
    data = encode(done)
    assert msgspec.msgpack.decode(data) == ["t-1", 3, 4096]
    assert decode_done(data) == done


def test_done_is_not_a_control_message() -> None:
    with pytest.raises(ProtocolError):
        decode(encode(Done("t-1", 0, 1)))


@pytest.mark.parametrize(
    "data",
    [b"\xc1", msgspec.msgpack.encode(["t-1", "zero", 1]), msgspec.msgpack.encode(["t-1", 0]),
     msgspec.msgpack.encode(["t-1", 0, 1, 2]), encode(Abort("t-1", "x"))],
    ids=["garbage", "wrong-type", "too-short", "too-long", "control-message"],
)
def test_bad_done_is_a_protocol_error(data: bytes) -> None:
    with pytest.raises(ProtocolError, match="unreadable transfer notification"):
        decode_done(data)


def test_sub_transfer_id_names_the_layer() -> None:
    assert sub_transfer_id("t-42", 0) == "t-42#0"
    assert sub_transfer_id("t-42", 17) == "t-42#17"
    assert sub_transfer_id("a", 1) != sub_transfer_id("a", 11)
