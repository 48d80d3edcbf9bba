"""Per-peer state of the control plane: the handshake on both ends of a link.

``ProducerLinks`` (on a producer) checks a consumer's ``Hello`` - wire version, layout
fingerprint, transport - connects the data path to it and keeps the consumer's KV
layout to address its blocks. ``ConsumerLinks`` (on a consumer) sends ``Hello`` before
the first grant to a producer and remembers a refusal, so every transfer to an
incompatible producer fails at once with the reason instead of timing out.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import msgspec

from pdfabric.errors import FabricError
from pdfabric.connector.staging import slot_layout
from pdfabric.layout import KVGeometry, KVLayout, LayoutFingerprint, pair_columns
from pdfabric.protocol.messages import WIRE_VERSION, Hello, HelloOk, LayoutInfo, Message, Refuse
from pdfabric.transports.base import PeerDescriptor, PeerId, TransferPlan, Transport

__all__ = ["ConsumerLink", "ProducerLinks", "ConsumerLinks", "layout_info"]

log = logging.getLogger("pdfabric.connector")


def layout_info(layout: KVLayout) -> LayoutInfo:
    g = layout.geometry
    geometry = {
        "kind": g.kind, "num_layers": g.num_layers, "num_blocks": g.num_blocks, "block_size": g.block_size,
        "num_kv_heads": g.num_kv_heads, "head_dim": g.head_dim, "dtype": g.dtype, "element_size": g.element_size,
    }
    return LayoutInfo(geometry, list(layout.layer_addrs), layout.block_stride, layout.segment_stride)


def layout_from_info(info: LayoutInfo) -> KVLayout:
    geometry = KVGeometry(**info.geometry)  # type: ignore[arg-type]
    return KVLayout.from_geometry(
        geometry, info.layer_addrs, block_stride=info.block_stride, segment_stride=info.segment_stride
    )


@dataclass
class ConsumerLink:
    engine: str
    layout: KVLayout
    peer_id: PeerId

    def plan(self, tid: str, src_layout: KVLayout, src: list[int], dst: list[int], layer: int,
             staging: int = 0) -> TransferPlan:
        """One layer's blocks ``src`` here -> ``dst`` in the consumer, as plan columns; into
        the consumer's staging slot at ``staging`` instead when it is not 0."""
        there = self.layout
        if staging:
            there, dst = slot_layout(self.layout, staging, len(dst)), list(range(len(dst)))
        return TransferPlan.from_arrays(tid, *pair_columns(src_layout, src, there, dst, layers=[layer]))


class ProducerLinks:
    def __init__(self, engine: str, fingerprint: LayoutFingerprint, transport: Transport, connect_timeout_s: float) -> None:
        self.engine = engine
        self.fingerprint = fingerprint
        self.transport = transport
        self.connect_timeout_s = connect_timeout_s
        self._links: dict[str, ConsumerLink] = {}
        self.refused = 0

    def get(self, peer: str) -> ConsumerLink | None:
        return self._links.get(peer)

    def hello(self, peer: str, msg: Hello) -> Message:
        try:
            link = self._accept(msg)
        except (FabricError, ValueError, msgspec.DecodeError) as e:
            self.refused += 1
            self._links.pop(peer, None)
            log.warning("pdfabric: refused consumer %s (%s): %s", msg.engine, peer, e)
            return Refuse(str(e))
        self._links[peer] = link
        log.info("pdfabric: consumer %s connected over %s", msg.engine, self.transport.name)
        return HelloOk(self.engine, self.fingerprint.as_dict(), self.transport.descriptor().incarnation)

    def _accept(self, msg: Hello) -> ConsumerLink:
        if msg.wire_version != WIRE_VERSION:
            raise FabricError(f"consumer speaks control wire version {msg.wire_version}, producer {WIRE_VERSION}")
        theirs = LayoutFingerprint.from_dict(msg.fingerprint)
        self.fingerprint.check_compatible(theirs, local="producer", remote=f"consumer {msg.engine}")
        layout = layout_from_info(msg.layout)
        desc = msgspec.msgpack.decode(msg.data, type=PeerDescriptor)
        if desc.transport != self.transport.name:
            raise FabricError(f"consumer uses transport {desc.transport!r}, producer {self.transport.name!r}; "
                              "configure the same transport on both")
        peer_id = self.transport.connect(desc, self.connect_timeout_s)
        return ConsumerLink(msg.engine, layout, peer_id)


class ConsumerLinks:
    """A consumer's handshake state per producer address."""

    def __init__(self, engine: str, fingerprint: LayoutFingerprint, layout: KVLayout, transport: Transport) -> None:
        self.engine = engine
        self.fingerprint = fingerprint
        self.layout = layout
        self.transport = transport
        self._state: dict[str, str] = {}  # addr -> "sent" | "ok" | refusal reason
        self._writers: dict[str, str] = {}  # addr -> its transport's incarnation (HelloOk)

    def before_grant(self, addr: str) -> list[Message]:
        """Messages to send ahead of a grant to ``addr``: a Hello on a new link."""
        if addr in self._state and self._state[addr] in ("sent", "ok"):
            return []
        self._state[addr] = "sent"
        data = msgspec.msgpack.encode(self.transport.descriptor())
        return [Hello(WIRE_VERSION, self.engine, self.fingerprint.as_dict(), layout_info(self.layout), data)]

    def reply(self, addr: str, msg: HelloOk | Refuse) -> str:
        """Record a handshake answer; returns the refusal reason ("" when accepted)."""
        if isinstance(msg, HelloOk):
            self._state[addr] = "ok"
            self._writers[addr] = msg.writer
            return ""
        self._state.pop(addr, None)  # try again with the next request
        why = f"producer {addr} refused the handshake: {msg.reason}"
        log.warning("pdfabric: %s", why)
        return why

    def writer(self, addr: str) -> str | None:
        """The incarnation of ``addr``'s transport, once its handshake was answered: the
        expected writer of the grants sent there (None before: any peer)."""
        return self._writers.get(addr)

    def forget(self, addr: str) -> None:
        self._state.pop(addr, None)
        self._writers.pop(addr, None)
