"""Test support that ships with pdfabric: the transport conformance suite, child-process
peers, and (later) fakes and the tiny test model builder."""

from __future__ import annotations

from .conformance import CHECKS, Buffer, PairFactory, check_transport, scattered_plan
from .peer import PeerProcess, PeerRequestError, decode_descriptor, encode_descriptor

__all__ = [
    "CHECKS",
    "Buffer",
    "PairFactory",
    "PeerProcess",
    "PeerRequestError",
    "check_transport",
    "decode_descriptor",
    "encode_descriptor",
    "scattered_plan",
]
