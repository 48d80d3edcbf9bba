"""HMAC envelopes: seal/open round trip and every refusal, each counted by reason."""

from __future__ import annotations

import itertools

import msgspec
import pytest

from pdfabric.errors import ProtocolMismatch
from pdfabric.protocol.auth import Authenticator, Refused
from pdfabric.protocol.messages import WIRE_VERSION, ProtocolError

SECRET = b"s3cret-shared-by-both-sides"


class Clock:
    def __init__(self, t: float = 1_700_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def pair(window_s: float = 60.0, *, rx_secret: bytes = SECRET) -> tuple[Authenticator, Authenticator, Clock]:
    clock = Clock()
    n = itertools.count()
    tx = Authenticator(SECRET, "decode-0", window_s=window_s, clock=clock, nonce=lambda: next(n).to_bytes(12, "big"))
    rx = Authenticator(rx_secret, "prefill-0", window_s=window_s, clock=clock)
    return tx, rx, clock


def refused(rx: Authenticator, frames: list[bytes], reason: str) -> Refused:
    with pytest.raises(Refused) as info:
        rx.open(frames)
    assert info.value.reason == reason
    assert rx.refused[reason] == 1
    return info.value


def test_round_trip_returns_sender_and_body() -> None:
    tx, rx, _ = pair()
    frames = tx.seal(b"hello body")
    assert len(frames) == 3 and frames[1] == b"hello body"
    assert rx.open(frames) == ("decode-0", b"hello body")
    assert sum(rx.refused.values()) == 0


def test_header_carries_version_sender_time_nonce() -> None:
    tx, _, clock = pair()
    header = tx.seal(b"x")[0]
    version, sender, ts_ms, nonce = msgspec.msgpack.decode(header)
    assert (version, sender, ts_ms) == (WIRE_VERSION, "decode-0", int(clock.t * 1000))
    assert isinstance(nonce, bytes) and len(nonce) == 12


def test_default_nonces_differ() -> None:
    tx = Authenticator(SECRET, "a")
    h1, h2 = tx.seal(b"x")[0], tx.seal(b"x")[0]
    assert msgspec.msgpack.decode(h1)[3] != msgspec.msgpack.decode(h2)[3]


def test_other_secret_is_bad_mac() -> None:
    tx, rx, _ = pair(rx_secret=b"another secret")
    err = refused(rx, tx.seal(b"body"), "bad_mac")
    assert isinstance(err, ProtocolError)
    assert "secret" in str(err)


def test_tampered_body_is_bad_mac() -> None:
    tx, rx, _ = pair()
    header, _, mac = tx.seal(b'{"blocks": [1, 2]}')
    refused(rx, [header, b'{"blocks": [9, 9]}', mac], "bad_mac")


def test_tampered_header_is_bad_mac() -> None:
    tx, rx, clock = pair()
    _, body, mac = tx.seal(b"body")
    forged = msgspec.msgpack.encode([WIRE_VERSION, "prefill-9", int(clock.t * 1000), b"\x00" * 12])
    refused(rx, [forged, body, mac], "bad_mac")


def test_truncated_mac_is_bad_mac() -> None:
    tx, rx, _ = pair()
    header, body, mac = tx.seal(b"body")
    refused(rx, [header, body, mac[:-1]], "bad_mac")


@pytest.mark.parametrize("count", [0, 1, 2, 4])
def test_wrong_frame_count_is_malformed(count: int) -> None:
    tx, rx, _ = pair()
    frames = tx.seal(b"body")
    frames = (frames + [b"extra"])[:count]
    err = refused(rx, frames, "malformed")
    assert str(count) in str(err)


def test_unreadable_header_with_valid_mac_is_malformed() -> None:
    # Someone holding the secret but speaking another header format.
    header = msgspec.msgpack.encode({"v": WIRE_VERSION})
    mac = Authenticator(SECRET, "x")._mac(header, b"body")
    _, rx, _ = pair()
    refused(rx, [header, b"body", mac], "malformed")


def test_wrong_wire_version_is_protocol_mismatch() -> None:
    _, rx, clock = pair()
    header = msgspec.msgpack.encode([WIRE_VERSION + 1, "decode-new", int(clock.t * 1000), b"n" * 12])
    mac = Authenticator(SECRET, "x")._mac(header, b"body")
    with pytest.raises(ProtocolMismatch) as info:
        rx.open([header, b"body", mac])
    assert info.value.peer == "decode-new"
    assert str(WIRE_VERSION + 1) in str(info.value)
    assert rx.refused["version"] == 1


@pytest.mark.parametrize("skew", [-61.0, 61.0])
def test_timestamp_outside_window_is_stale(skew: float) -> None:
    tx, rx, clock = pair(window_s=60.0)
    frames = tx.seal(b"body")
    clock.t += skew
    err = refused(rx, frames, "stale")
    assert "61.0s" in str(err)


@pytest.mark.parametrize("skew", [-59.0, 59.0])
def test_timestamp_inside_window_is_accepted(skew: float) -> None:
    tx, rx, clock = pair(window_s=60.0)
    frames = tx.seal(b"body")
    clock.t += skew
    assert rx.open(frames) == ("decode-0", b"body")


def test_replay_is_refused() -> None:
    tx, rx, _ = pair()
    frames = tx.seal(b"grant t-1")
    rx.open(frames)
    err = refused(rx, list(frames), "replay")
    assert "replay" in str(err)


def test_distinct_envelopes_with_same_body_are_not_replays() -> None:
    tx, rx, _ = pair()
    for _ in range(3):
        assert rx.open(tx.seal(b"same")) == ("decode-0", b"same")
    assert sum(rx.refused.values()) == 0


def test_replay_after_window_is_stale_not_accepted() -> None:
    # Forgetting a nonce must never reopen the door: an old envelope is stale by then.
    tx, rx, clock = pair(window_s=10.0)
    frames = tx.seal(b"body")
    rx.open(frames)
    clock.t += 11.0
    rx.open(tx.seal(b"later"))  # makes the receiver forget old nonces
    refused(rx, frames, "stale")


def test_refusals_are_counted_separately() -> None:
    tx, rx, clock = pair()
    good = tx.seal(b"a")
    rx.open(good)
    for frames in (good, good[:2], [good[0], b"b", good[2]]):
        with pytest.raises(Refused):
            rx.open(frames)
    clock.t += 120
    with pytest.raises(Refused):
        rx.open(good)  # now both a replay and stale: stale is checked first
    assert rx.refused == {"replay": 1, "malformed": 1, "bad_mac": 1, "stale": 1}
