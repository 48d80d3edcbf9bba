"""Worker side of the connector (runs in each vLLM worker process).

Owns the transport (the worker's KV tensors registered whole), the control endpoint
(``control.py``) and the two pure transfer tables (``pdfabric.protocol.producer`` /
``consumer``). Two threads touch it: vLLM's engine thread (the KV connector hooks) and
the control thread (messages from peers); one lock orders them.

Producer: a transfer's layers are pushed from ``save_kv_layer`` while the final prefill
step runs when the grant is already there, else from the control thread when it comes.
Consumer: grants are sent when vLLM allocated blocks; completion is polled once per
engine step (vLLM keeps stepping while requests wait for remote KV).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter, deque
from typing import Any, Callable

import msgspec

from pdfabric.connector.control import ControlEndpoint
from pdfabric.connector.faults import late_write, scramble
from pdfabric.connector.kvcache import CacheLoad, CacheMover, CacheStore, ChunkCopier
from pdfabric.connector.links import ConsumerLinks, ProducerLinks
from pdfabric.connector.params import StepMeta
from pdfabric.connector.settings import Resolved
from pdfabric.connector.staging import Stager, register_memory
from pdfabric.layout import KVLayout
from pdfabric.protocol import consumer as C
from pdfabric.protocol import producer as P
from pdfabric.protocol.auth import Authenticator
from pdfabric.protocol.messages import (
    Abort,
    Done,
    Grant,
    Heartbeat,
    Hello,
    HelloOk,
    Message,
    Refuse,
    Status,
    StatusReply,
    decode_done,
    encode,
    sub_transfer_id,
)
from pdfabric.transports.base import Status as XStatus
from pdfabric.transports.base import TransferHandle, Transport
from pdfabric.transports.registry import create_from_config

__all__ = ["FabricWorker"]

log = logging.getLogger("pdfabric.connector")


class FabricWorker:
    def __init__(
        self,
        settings: Resolved,
        *,
        engine: str,
        model: str,
        producer: bool,
        consumer: bool,
        block_size: int,
        tp_rank: int = 0,
        tp_size: int = 1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.model = model
        self.producer, self.consumer = producer, consumer
        self.block_size = block_size
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self._clock = clock
        self._lock = threading.RLock()
        self.counters: Counter[str] = Counter()
        self.layout: KVLayout | None = None
        self.transport: Transport | None = None
        self.control: ControlEndpoint | None = None
        self.ptable: P.ProducerTable | None = None
        self.ctable: C.ConsumerTable | None = None
        self._layer_index: dict[str, int] = {}
        self._pushes: dict[tuple[str, int], TransferHandle] = {}
        self._sent: set[str] = set()
        self._recvd: set[str] = set()
        self._failed: set[str] = set()
        self._meta: StepMeta | None = None
        self._timers: list[threading.Timer] = []
        self._idle = False
        self._wake = threading.Event()  # set by the control thread when it changed something
        self._recv_seen = 0
        self._granted_blocks: dict[str, list[int]] = {}
        self._grants_sent: dict[str, tuple[Grant, int]] = {}  # grant, times repeated
        self._recent: deque[tuple[str, int, float]] = deque(maxlen=256)
        self._pushed: deque[tuple[str, int, float]] = deque(maxlen=256)
        self._push_clock: dict[str, list[float]] = {}  # tid -> [seconds on the wire, bytes]
        self._fingerprint: dict[str, str | int] = {}
        self._consumers: ProducerLinks | None = None  # producer's view of its consumers
        self._producers: ConsumerLinks | None = None  # consumer's view of its producers
        self.cache: CacheMover | None = None
        self.stager: Stager | None = None  # host staging (KV the transport cannot reach)
        self._slots: dict[str, int] = {}  # consumer: tid -> staging slot offset
        self._staged: dict[tuple[str, int], int] = {}  # producer: (tid, layer) -> slot offset
        # requests whose receive (or release) needs two parts: cache load + transfer (store + push)
        self._recv_parts: dict[str, list[int]] = {}  # req -> [parts left, failed?]
        self._send_parts: dict[str, int] = {}  # req -> parts left

    # -- set-up ------------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, Any]) -> None:
        layout = KVLayout.from_kv_caches(kv_caches, block_size=self.block_size)
        opts: dict[str, Any] = {}
        if self.settings.transport.kind == "tcp":
            opts["host"] = self.settings.control_host
        transport = create_from_config(self.settings.transport, **opts)
        self.stager = register_memory(transport, layout, kv_caches, self.settings.staging, self.settings.staging_bytes)
        self.layout, self.transport = layout, transport
        self._layer_index = {n: i for i, n in enumerate(layout.layer_names)}
        fp = layout.fingerprint(self.model, self.tp_rank, self.tp_size)
        self._fingerprint = fp.as_dict()
        n = layout.geometry.num_layers
        s = self.settings
        if self.producer:
            self.ptable = P.ProducerTable(n, self.block_size, s.lease_s, s.grant_wait_s)
            self._consumers = ProducerLinks(self.engine, fp, transport, getattr(s.transport, "connect_timeout_s", 5.0))
        if self.consumer:
            self.ctable = C.ConsumerTable(n, self.engine, s.transfer_timeout_s)
            self._producers = ConsumerLinks(self.engine, fp, layout, transport)
        if s.cache is not None:
            self.cache = self._open_cache(layout)
        port = s.control_port
        bind = (s.control_host, port + self.tp_rank) if port is not None else None
        ident = f"{self.engine}/{self.tp_rank}/{os.urandom(4).hex()}".encode()
        auth = Authenticator(s.secret, self.engine, window_s=s.status_window_s)
        self.control = ControlEndpoint(auth, self._on_message, bind, ident, on_tick=self._tick)
        if s.secret_source == "none":
            log.warning("pdfabric: no control-plane secret configured: messages are checked for integrity "
                        "but any local process can send them; set kv_connector_extra_config.secret")
        log.info("pdfabric: worker %s ready: %s transport, %d layers, control %s, auth %s%s",
                 self.engine, transport.name, n, f"{bind[0]}:{bind[1]}" if bind else "outbound only",
                 s.secret_source, f", staging through {s.staging_bytes} host bytes" if self.stager else "")

    def _open_cache(self, layout: KVLayout) -> CacheMover | None:
        from pdfabric.cache.client import RemoteCacheClient
        from pdfabric.connector.local_cache import local_client

        cs = self.settings.cache
        assert cs is not None
        if self.tp_size > 1:
            log.error("pdfabric cache: tensor parallel engines (tp=%d) cannot use the shared cache yet; "
                      "it is off for %s", self.tp_size, self.engine)
            return None
        if layout.device != "cpu":  # the copier reads KV through host pointers
            log.error("pdfabric cache: the shared cache is off for %s: its KV is on %s", self.engine, layout.device)
            return None
        copier = ChunkCopier(layout, cs.chunk_tokens)
        if cs.server is not None:
            client: Any = RemoteCacheClient(cs.server, copier.chunk_bytes, name=f"{self.engine}/worker",
                                            timeout_s=cs.timeout_s)
        else:
            client = local_client(cs, copier.chunk_bytes)
        log.info("pdfabric cache: %s uses %s, %d-token chunks of %d bytes", self.engine,
                 f"the cache server {cs.server}" if cs.server else "a cache in this process",
                 cs.chunk_tokens, copier.chunk_bytes)
        return CacheMover(client, copier)

    # -- engine thread -----------------------------------------------------------------
    def bind(self, meta: StepMeta | None) -> None:
        self._meta = meta
        self._idle = meta is not None and meta.idle

    def _ingest(self) -> None:
        meta, self._meta = self._meta, None
        if meta is None or meta.empty():
            return
        now = self._clock()
        with self._lock:
            self._ingest_cache(meta)
            if self.ctable is not None:
                self._ingest_consumer(meta, now)
            if self.ptable is not None:
                for sr in meta.sends:
                    self._do(self.ptable.scheduled(sr.req_id, sr.transfer_id, sr.blocks, sr.prompt_len, sr.prompt_len, now))
                for fs in meta.finished_sends:
                    self._do(self.ptable.finished(fs.req_id, fs.transfer_id, fs.aborted, fs.held, now))

    def _ingest_cache(self, meta: StepMeta) -> None:
        jobs: list[CacheLoad | CacheStore] = [*meta.cache_loads, *meta.cache_stores]
        if not jobs:
            return
        for job in jobs:
            if isinstance(job, CacheLoad) and job.with_transfer:
                self._recv_parts[job.req_id] = [2, 0]
            elif isinstance(job, CacheStore) and job.with_push:
                self._send_parts[job.req_id] = 2
            if self.cache is None:  # the cache is off here: loads fail (recompute), stores end at once
                if isinstance(job, CacheLoad):
                    self._recv_done(job.req_id, False)
                else:
                    self._send_done(job.req_id)
            else:
                self.cache.submit(job)

    def _recv_done(self, rid: str, ok: bool) -> None:
        """One part of a receive finished (lock held): report it once every part has."""
        parts = self._recv_parts.get(rid)
        if parts is not None:
            parts[0] -= 1
            parts[1] |= not ok
            if parts[0] > 0:
                return
            del self._recv_parts[rid]
            ok = not parts[1]
        (self._recvd if ok else self._failed).add(rid)

    def _send_done(self, rid: str) -> None:
        """One reason to hold a request's blocks ended (lock held)."""
        left = self._send_parts.get(rid)
        if left is not None:
            if left > 1:
                self._send_parts[rid] = left - 1
                return
            del self._send_parts[rid]
        self._sent.add(rid)

    def _collect_cache(self) -> None:
        if self.cache is None:
            return
        loaded, failed, stored = self.cache.results()
        for rid in loaded:
            self._recv_done(rid, True)
        for rid in failed:
            self.counters["cache_load_failures"] += 1
            self._recv_done(rid, False)
        for rid in stored:
            self._send_done(rid)

    def _ingest_consumer(self, meta: StepMeta, now: float) -> None:
        assert self.ctable is not None and self._producers is not None and self.control is not None
        for r in meta.recvs:
            self._do(self.ctable.requested(r.req_id, r.transfer_id, r.producer, r.blocks, r.first_block, r.num_tokens, now))
        for rid in meta.aborted_recvs:
            self._do(self.ctable.local_abort(rid))
        for producer, tid, reason in meta.unsent_aborts:
            self.control.send(f"d:{producer}", Abort(tid, reason))
        for producer, tids in meta.heartbeats.items():
            self.control.send(f"d:{producer}", Heartbeat(tids))

    def save_kv_layer(self, layer_name: str) -> None:
        self._ingest()
        if self.ptable is None:
            return
        layer = self._layer_index.get(layer_name)
        if layer is None:
            return
        with self._lock:
            self._do(self.ptable.layer_saved(layer))

    def step_end(self) -> None:
        """``wait_for_save``: this step's KV is in place."""
        self._ingest()
        if self.ptable is not None:
            with self._lock:
                self._do(self.ptable.step_done())

    def transfer_results(self) -> tuple[set[str], set[str], set[str]]:
        """(finished sending, finished receiving, failed receiving) since the last call."""
        self._ingest()
        if self._idle and not (self._sent or self._recvd or self._failed):
            self._idle_wait()
        now = self._clock()
        with self._lock:
            self._collect_cache()
            if self.transport is not None:
                self._recv_seen = self.transport.recv_changes()
            if self.ptable is not None:
                self._poll_pushes()
                self._do(self.ptable.tick(now))
            if self.ctable is not None:
                self._poll_recvs()
                self._do(self.ctable.tick(now))
            out = (self._sent, self._recvd, self._failed)
            self._sent, self._recvd, self._failed = set(), set(), set()
        return out

    def _idle_wait(self) -> None:
        """On a step where the engine computes nothing, vLLM calls us again at once: sleep
        until a transfer moves (or ``idle_wait_s``) instead of spinning a core that the
        other engine on this host needs for its prefill."""
        t, limit = self.transport, self.settings.idle_wait_s
        receiving = self.ctable is not None and bool(self.ctable.open_transfers())
        caching = self.cache is not None and self.cache.busy()
        if t is None or limit <= 0 or not (receiving or caching or self._pushes
                                           or self.ptable and self.ptable.held_requests()):
            return
        deadline = time.monotonic() + limit
        while (left := deadline - time.monotonic()) > 0:
            slice_s = min(left, 0.001)
            if caching and self.cache is not None and self.cache.wait(0 if receiving else slice_s):
                return
            if receiving and t.wait_recv_change(self._recv_seen, slice_s) != self._recv_seen:
                return
            pushes = list(self._pushes.values())
            if pushes and pushes[0].wait_done(slice_s if not receiving else 0):
                return
            if self._wake.wait(0 if receiving or pushes else slice_s):
                self._wake.clear()
                return

    def _tick(self) -> None:
        """Control thread, every 100 ms: lease and grant timers fire even on an idle engine."""
        now = self._clock()
        with self._lock:
            if self.ptable is not None:
                self._do(self.ptable.tick(now))
            if self.ctable is not None:
                self._do(self.ctable.tick(now))

    def _poll_pushes(self) -> None:
        assert self.ptable is not None
        for key, h in list(self._pushes.items()):
            if h.status.finished:
                del self._pushes[key]
                self._unstage(self._staged, key)
                err = None if h.status is XStatus.DONE else str(h.error or h.status.value)
                self._do(self.ptable.push_result(key[0], key[1], err))
                self._time_push(key[0], h, err is None)

    def _time_push(self, tid: str, h: TransferHandle, ok: bool) -> None:
        """Record a transfer's wire time: the sum of its layer writes' write-to-ack times
        (layers leave one by one as the forward computes them; the gaps are compute)."""
        clock = self._push_clock.setdefault(tid, [0.0, 0.0])
        clock[0] += h.seconds or 0.0
        clock[1] += h.nbytes if ok else 0
        assert self.ptable is not None
        s = self.ptable.get(tid)
        if (s is None or len(s.landed) >= self.ptable.num_layers) and h.finished_at is not None:
            del self._push_clock[tid]
            if ok:
                self._pushed.append((tid, int(clock[1]), round(clock[0], 6)))

    def _poll_recvs(self) -> None:
        assert self.ctable is not None and self.transport is not None
        t = self.transport
        for tid in self.ctable.open_transfers():
            r = self.ctable.get(tid)
            if r is None:
                continue
            for layer in range(self.ctable.num_layers):
                if layer in r.landed or self.ctable.get(tid) is None:
                    continue
                sub = sub_transfer_id(tid, layer)
                try:
                    if t.poll_recv(sub) is XStatus.PENDING:
                        continue
                    res = t.wait_recv(sub, 0)
                    done = decode_done(res.notify)
                    if (done.transfer_id, done.layer, done.nbytes) != (tid, layer, res.nbytes):
                        raise ValueError(f"notification {done} does not match layer {layer} ({res.nbytes} bytes)")
                    if tid in self._slots and self.stager is not None:
                        self.stager.land(self._slots[tid], self._granted_blocks[tid], layer)
                except Exception as e:  # every failure of one layer fails the transfer
                    self._do(self.ctable.failed(tid, f"layer {layer}: {e}"))
                    break
                if len(r.landed) == self.ctable.num_layers - 1 and self.settings.faults.hit(
                    self.settings.faults.corrupt_prefix, tid
                ):
                    assert self.layout is not None
                    scramble(self.layout, self._granted_blocks.get(tid, []), tid)
                    self.counters["fault_corrupted_transfers"] += 1
                self._do(self.ctable.layer_landed(tid, layer, res.nbytes))

    # -- actions (lock held) -------------------------------------------------------------
    def _do(self, actions: list[Any]) -> None:
        for a in actions:
            if isinstance(a, P.PushLayers):
                self._push(a.transfer_id, a.layers)
            elif isinstance(a, (P.SendAbort, C.SendAbort)):
                peer = a.peer if isinstance(a, P.SendAbort) else f"d:{a.producer}"
                if peer and self.control is not None:
                    self.control.send(peer, Abort(a.transfer_id, a.reason))
            elif isinstance(a, P.Release):
                self._send_done(a.request_id)
                self.counters["released"] += 1
            elif isinstance(a, C.SendGrant):
                self._grant(a)
            elif isinstance(a, C.Revoke):
                assert self.transport is not None  # all layers end, then drain together
                self.transport.revoke_many([sub_transfer_id(a.transfer_id, layer) for layer in a.layers])
            elif isinstance(a, C.Finish):
                self._finish(a)

    def _grant(self, a: C.SendGrant) -> None:
        assert self.transport is not None and self.layout is not None
        assert self._producers is not None and self.control is not None and self.ctable is not None
        g = a.grant
        self._granted_blocks[g.transfer_id] = list(g.blocks)
        try:
            where, ids = self.layout, list(g.blocks)
            if self.stager is not None and ids:
                self._slots[g.transfer_id] = off = self.stager.reserve(len(ids))
                g = msgspec.structs.replace(g, staging=self.stager.pool.base + off)
                where, ids = self.stager.slot_layout(g.staging, len(ids)), list(range(len(ids)))
            writer = self._producers.writer(a.producer)  # None until its handshake answered
            for layer in range(self.layout.geometry.num_layers):
                self.transport.grant(sub_transfer_id(g.transfer_id, layer), where.region_array(ids, [layer]), writer)
        except Exception as e:
            self._do(self.ctable.failed(g.transfer_id, f"cannot grant blocks: {e}", tell_producer=True))
            return
        for msg in self._producers.before_grant(a.producer):
            self.control.send(f"d:{a.producer}", msg)
        self.control.send(f"d:{a.producer}", g)
        self._grants_sent[g.transfer_id] = (g, 0)

    def _finish(self, a: C.Finish) -> None:
        self._granted_blocks.pop(a.transfer_id, None)
        self._unstage(self._slots, a.transfer_id)  # revoked (writes drained) before Finish
        self._grants_sent.pop(a.transfer_id, None)
        if a.ok:
            self._recv_done(a.request_id, True)
            if not a.aborted:
                self.counters["received"] += 1
                self.counters["received_bytes"] += a.nbytes
                self._recent.append((a.transfer_id, a.nbytes, round(self._clock() - a.started, 6)))
            return
        self._recv_done(a.request_id, False)
        self.counters["recomputes"] += 1
        log.warning("pdfabric: transfer %s for request %s failed: %s; the decode engine recomputes the prompt",
                    a.transfer_id, a.request_id, a.reason)

    def _push(self, tid: str, layers: tuple[int, ...]) -> None:
        assert self.ptable is not None and self._consumers is not None and self.transport is not None
        assert self.layout is not None
        s = self.ptable.get(tid)
        if s is None or s.grant is None:
            return
        g = s.grant
        link = self._consumers.get(s.peer)
        src = s.blocks[g.first_block: g.first_block + len(g.blocks)]
        faults = self.settings.faults
        for layer in layers:
            if faults.hit(faults.drop_prefix, tid):
                self._do(self.ptable.push_result(tid, layer, None))
                continue
            try:
                if link is None:
                    raise ConnectionError("no handshake with this consumer")
                here, ids = self._source(tid, layer, src)
                plan = link.plan(sub_transfer_id(tid, layer), here, ids, g.blocks, layer, g.staging)
                notify = encode(Done(tid, layer, plan.nbytes))
                if faults.hit(faults.delay_prefix, tid):
                    self._pushes[(tid, layer)] = late_write(self.transport, link.peer_id, plan, notify,
                                                            faults.delay_s, self._timers)
                    continue
                self._pushes[(tid, layer)] = self.transport.write(link.peer_id, plan, notify)
            except Exception as e:
                self._unstage(self._staged, (tid, layer))
                self._do(self.ptable.push_result(tid, layer, str(e)))

    def _source(self, tid: str, layer: int, src: list[int]) -> tuple[KVLayout, list[int]]:
        """Where a layer's write reads: the KV blocks, or a staging slot they were gathered to."""
        assert self.layout is not None
        if self.stager is None or not src:
            return self.layout, src
        self._staged[(tid, layer)], here = self.stager.stage(src, layer)
        return here, list(range(len(src)))

    def _unstage(self, slots: dict[Any, int], key: Any) -> None:
        """Give a staging slot back: a producer's once its write ended, a consumer's at Finish."""
        slot = slots.pop(key, None)
        if slot is not None and self.stager is not None:
            self.stager.release(slot)

    # -- control thread ------------------------------------------------------------------
    def _on_message(self, peer: str, msg: Message) -> list[Message]:
        self._wake.set()
        now = self._clock()
        with self._lock:
            if isinstance(msg, Status):
                return [self.status()]
            if isinstance(msg, Hello) and self._consumers is not None:
                return [self._consumers.hello(peer, msg)]
            if isinstance(msg, Grant) and self.ptable is not None and self._consumers is not None:
                if self._consumers.get(peer) is None:
                    self.counters["grants_without_hello"] += 1
                    return [Abort(msg.transfer_id, "no handshake from this consumer (did the producer restart?)", rehello=True)]
                self._do(self.ptable.granted(msg, peer, now))
                return []
            if isinstance(msg, Heartbeat) and self.ptable is not None:
                self.ptable.heartbeat(msg.transfer_ids, now)
                return []
            if isinstance(msg, Abort):
                return self._on_abort(peer, msg)
            if isinstance(msg, (HelloOk, Refuse)) and self._producers is not None:
                failed = self._producers.reply(peer[2:], msg)
                if failed and self.ctable is not None:
                    for tid in self.ctable.open_transfers():
                        r = self.ctable.get(tid)
                        if r is not None and r.producer == peer[2:]:
                            self._do(self.ctable.failed(tid, failed, tell_producer=False))
                return []
        self.counters["unexpected_messages"] += 1
        log.warning("pdfabric: unexpected %s from %s", type(msg).__name__, peer)
        return []

    def _on_abort(self, peer: str, msg: Abort) -> list[Message]:
        if peer.startswith("d:") and self.ctable is not None:
            sent = self._grants_sent.get(msg.transfer_id)
            if msg.rehello and self._producers is not None and self.control is not None:
                self._producers.forget(peer[2:])
                if sent is not None and sent[1] == 0:  # repeat the grant once, after a new Hello
                    self._grants_sent[msg.transfer_id] = (sent[0], 1)
                    for m in self._producers.before_grant(peer[2:]):
                        self.control.send(peer, m)
                    self.control.send(peer, sent[0])
                    self.counters["grants_repeated"] += 1
                    return []
            self._do(self.ctable.remote_abort(msg.transfer_id, msg.reason))
        elif self.ptable is not None:
            self._do(self.ptable.remote_abort(msg.transfer_id, msg.reason))
        return []

    def status(self) -> StatusReply:
        counters: Counter[str] = Counter(self.counters)
        open_: list[str] = []
        if self.ptable is not None:
            counters.update({f"producer_{k}": v for k, v in self.ptable.counters.items()})
            counters["held_requests"] = len(self.ptable.held_requests())
            counters["pushes_in_flight"] = len(self._pushes)
            open_ += self.ptable.open_transfers()
        if self.ctable is not None:
            counters.update({f"consumer_{k}": v for k, v in self.ctable.counters.items()})
            open_ += self.ctable.open_transfers()
        if self.transport is not None:
            counters["transport_rejections"] = len(self.transport.rejections)
        if self.stager is not None:
            counters["staging_bytes_in_use"] = self.stager.pool.in_use
            counters["staging_full"] = self.stager.full
        if self.cache is not None:
            counters.update({f"cache_{k}": int(v) for k, v in self.cache.counters.items()})
            counters.update({f"cache_client_{k}": v for k, v in self.cache.client.counters.items()})
        role = "both" if self.producer and self.consumer else "producer" if self.producer else "consumer"
        return StatusReply(role, self.engine, dict(counters), open_, self._fingerprint, list(self._recent),
                           list(self._pushed))

    # -- shutdown ----------------------------------------------------------------------
    def close(self) -> None:
        with self._lock:
            if self.ptable is not None:
                self._do(self.ptable.drop_all("the producer engine is shutting down"))
            if self.ctable is not None:
                self._do(self.ctable.drop_all("the decode engine is shutting down"))
        for t in self._timers:
            t.cancel()
        if self.control is not None:
            time.sleep(0.05)  # let the aborts above leave
            self.control.close()
        if self.transport is not None:
            self.transport.close()
        if self.cache is not None:
            self.cache.close()
