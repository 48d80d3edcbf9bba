"""The pdfabric error tree.

Every failure pdfabric raises is a ``FabricError``; callers catch the branch they can
handle::

    FabricError
    ├── ConfigError                      bad topology / options (path + expected + got)
    ├── LayoutError                      KV geometry that cannot be described or does not match
    ├── TransportError                   anything on the data path
    │   ├── TransportUnavailable         backend not installed / not usable on this machine
    │   ├── ConnectError                 peer unreachable, handshake refused
    │   │   └── StalePeer                descriptor of a peer that has since restarted
    │   ├── RegistrationError            memory not registered / grant outside registered memory
    │   ├── GrantRefused                 receiver refused a write (unknown id, outside the grant)
    │   ├── PeerGone                     peer died or closed mid-transfer
    │   ├── TransferAborted              transfer revoked / aborted by either side
    │   ├── FrameError                   corrupted or truncated frame on the wire
    │   ├── TransportClosed              operation on a closed transport
    │   └── TransferTimeout              (also a TimeoutError) no completion in time
    ├── ProtocolMismatch                 wire version / layout fingerprint differ
    ├── CacheError                       tiered cache failures
    └── ProxyError                       routing proxy failures

Errors carry optional context (``request_id``, ``transfer_id``, ``peer``, ``transport``)
and an HTTP-ish ``status_hint`` the proxy maps to a response code.
"""

from __future__ import annotations

__all__ = [
    "FabricError",
    "ConfigError",
    "LayoutError",
    "TransportError",
    "TransportUnavailable",
    "ConnectError",
    "StalePeer",
    "RegistrationError",
    "GrantRefused",
    "PeerGone",
    "TransferAborted",
    "FrameError",
    "TransportClosed",
    "TransferTimeout",
    "ProtocolMismatch",
    "CacheError",
    "ProxyError",
]


class FabricError(Exception):
    """Root of every error pdfabric raises."""

    status_hint: int = 500

    def __init__(
        self,
        message: str,
        *,
        request_id: str | None = None,
        transfer_id: str | None = None,
        peer: str | None = None,
        transport: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.request_id = request_id
        self.transfer_id = transfer_id
        self.peer = peer
        self.transport = transport

    def __str__(self) -> str:
        ctx = [
            f"{k}={v}"
            for k, v in (
                ("transport", self.transport),
                ("peer", self.peer),
                ("transfer", self.transfer_id),
                ("request", self.request_id),
            )
            if v
        ]
        return f"{self.message} [{', '.join(ctx)}]" if ctx else self.message


class ConfigError(FabricError):
    """Invalid configuration. ``path`` names where (``instances[1].port``)."""

    status_hint = 400

    def __init__(self, message: str, *, path: str | None = None, source: str | None = None) -> None:
        where = ""
        if source:
            where += f"{source}: "
        if path:
            where += f"{path}: "
        super().__init__(where + message)
        self.path = path
        self.source = source


class LayoutError(FabricError):
    """KV geometry that cannot be described, or two layouts that do not match."""


class TransportError(FabricError):
    """A failure on the data path."""

    status_hint = 502


class TransportUnavailable(TransportError):
    """The backend is not installed or cannot run on this machine; message says how to fix."""

    status_hint = 503


class ConnectError(TransportError):
    """The peer could not be reached or refused the handshake."""


class StalePeer(ConnectError):
    """The descriptor belongs to an earlier incarnation of the peer (it restarted)."""


class RegistrationError(TransportError):
    """Memory used in a transfer or grant is not inside registered regions."""


class GrantRefused(TransportError):
    """The receiver refused a write: unknown transfer id, or bytes outside the grant."""


class PeerGone(TransportError):
    """The peer died or closed its connection before the transfer finished."""


class TransferAborted(TransportError):
    """The transfer was revoked or aborted by either side."""


class FrameError(TransportError):
    """A corrupted, truncated or unexpected frame arrived; the connection was closed."""


class TransportClosed(TransportError):
    """The transport (or the handle's connection) was already closed."""


class TransferTimeout(TransportError, TimeoutError):
    """The transfer did not complete within its timeout."""

    status_hint = 504


class ProtocolMismatch(FabricError):
    """Wire versions or layout fingerprints of two peers differ."""

    status_hint = 409


class CacheError(FabricError):
    """A tiered-cache operation failed."""


class ProxyError(FabricError):
    """A routing-proxy failure."""

    status_hint = 502
