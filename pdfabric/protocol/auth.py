"""HMAC envelopes for control messages.

Each control message travels as three ZMQ frames: ``header | body | mac`` where
``header`` is msgpack ``[wire_version, sender, unix_ms, nonce]`` and
``mac = HMAC-SHA256(secret, header || body)``. The receiver refuses (and counts):

- a frame count other than three, an unreadable header          -> "malformed"
- a MAC that does not verify (wrong secret, tampering)          -> "bad_mac"
- a wire version other than ours                                -> "version"
- a timestamp outside ``window_s`` of its clock                 -> "stale"
- a nonce already seen inside the window (a replay)             -> "replay"

Pure apart from the clock and the nonce source, which are injectable for tests.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import time
from collections import Counter, OrderedDict
from typing import Callable

import msgspec

from pdfabric.errors import ProtocolMismatch
from pdfabric.protocol.messages import WIRE_VERSION, ProtocolError

__all__ = ["Authenticator", "Refused"]


class Refused(ProtocolError):
    """An envelope that failed authentication; ``reason`` is the counter it went to."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class Authenticator:
    """Seals outgoing and opens incoming envelopes for one endpoint. Not thread safe:
    use one per socket-owning thread."""

    def __init__(
        self,
        secret: bytes,
        sender: str,
        *,
        window_s: float = 60.0,
        clock: Callable[[], float] = time.time,
        nonce: Callable[[], bytes] = lambda: os.urandom(12),
    ) -> None:
        self._secret = secret
        self.sender = sender
        self._window_ms = int(window_s * 1000)
        self._clock = clock
        self._nonce = nonce
        self._seen: OrderedDict[bytes, int] = OrderedDict()
        self.refused: Counter[str] = Counter()

    def _mac(self, header: bytes, body: bytes) -> bytes:
        return hmac.new(self._secret, header + body, hashlib.sha256).digest()

    def seal(self, body: bytes) -> list[bytes]:
        now_ms = int(self._clock() * 1000)
        header = msgspec.msgpack.encode([WIRE_VERSION, self.sender, now_ms, self._nonce()])
        return [header, body, self._mac(header, body)]

    def open(self, frames: list[bytes]) -> tuple[str, bytes]:
        """Return ``(sender, body)`` of an authentic, fresh envelope; raise ``Refused``."""
        if len(frames) != 3:
            self._refuse("malformed", f"expected 3 frames (header, body, mac), got {len(frames)}")
        header, body, mac = frames
        if not hmac.compare_digest(self._mac(header, body), mac):
            self._refuse("bad_mac", "message authentication failed (wrong shared secret?)")
        try:
            version, sender, ts_ms, nonce = msgspec.msgpack.decode(header, type=tuple[int, str, int, bytes])
        except msgspec.DecodeError as e:
            self._refuse("malformed", f"unreadable envelope header: {e}")
        if version != WIRE_VERSION:
            self.refused["version"] += 1
            raise ProtocolMismatch(
                f"peer {sender!r} speaks control wire version {version}, this side {WIRE_VERSION}; "
                "run the same pdfabric release on both sides",
                peer=sender,
            )
        now_ms = int(self._clock() * 1000)
        if abs(now_ms - ts_ms) > self._window_ms:
            self._refuse("stale", f"message from {sender!r} is {abs(now_ms - ts_ms) / 1000:.1f}s off this clock")
        self._forget(now_ms)
        if nonce in self._seen:
            self._refuse("replay", f"message from {sender!r} was already received (replay)")
        self._seen[nonce] = ts_ms
        return sender, body

    def _forget(self, now_ms: int) -> None:
        while self._seen:
            nonce, ts = next(iter(self._seen.items()))
            if now_ms - ts <= self._window_ms and len(self._seen) < 1_000_000:
                break
            self._seen.popitem(last=False)

    def _refuse(self, reason: str, message: str) -> None:
        self.refused[reason] += 1
        raise Refused(reason, message)
