"""Transports: the data paths that move KV blocks between engines.

See ``pdfabric.transports.base`` for the interface. ``create(name, **options)`` builds one
by name; heavy optional backends (nixl, ucxx, cupy) are imported only when asked for.
"""

from __future__ import annotations

from .base import (
    Capabilities,
    PeerDescriptor,
    PeerId,
    RecvResult,
    Rejection,
    Status,
    TransferHandle,
    TransferId,
    TransferPlan,
    Transport,
)
from .registry import TRANSPORTS, available, create, create_from_config, transport_class

__all__ = [
    "Capabilities",
    "PeerDescriptor",
    "PeerId",
    "RecvResult",
    "Rejection",
    "Status",
    "TransferHandle",
    "TransferId",
    "TransferPlan",
    "Transport",
    "TRANSPORTS",
    "available",
    "create",
    "create_from_config",
    "transport_class",
]
