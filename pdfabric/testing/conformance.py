"""The transport conformance suite: every transport passes all of it.

``check_transport(make_pair, name=..., options=...)`` runs every check; each ``check_*``
can also run alone (the test suite parametrizes them so a failure names the check).
``make_pair()`` returns a fresh, unconnected ``(sender, receiver)`` pair in this process;
the caller does not close them - the checks do. Peer-death checks start the other end in
a child process (``PeerProcess``) unless the transport is in-process only.

Each check raises ``AssertionError`` with what was expected and what happened.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from pdfabric.errors import (
    ConnectError,
    GrantRefused,
    PeerGone,
    RegistrationError,
    TransferAborted,
    TransferTimeout,
    TransportClosed,
    TransportError,
)
from pdfabric.memory import Region, region_of
from pdfabric.transports import PeerId, Status, TransferId, TransferPlan, Transport

from .peer import PeerProcess, decode_descriptor, encode_descriptor

__all__ = ["check_transport", "CHECKS", "Buffer", "scattered_plan", "PairFactory"]

PairFactory = Callable[[], tuple[Transport, Transport]]
SENTINEL = 0xA5
KiB, MiB = 1024, 1024 * 1024


@dataclass
class Buffer:
    """A registered-able byte buffer (numpy) with its region."""

    array: np.ndarray

    @classmethod
    def random(cls, size: int, seed: int) -> "Buffer":
        return cls(np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8))

    @classmethod
    def filled(cls, size: int, value: int = SENTINEL) -> "Buffer":
        return cls(np.full(size, value, dtype=np.uint8))

    @property
    def region(self) -> Region:
        return region_of(self.array)

    def block(self, i: int, size: int) -> Region:
        return Region(self.region.addr + i * size, size)


def scattered_plan(
    tid: str, src: Region, dst: Region, block: int, nblocks: int, rng: np.random.Generator
) -> tuple[TransferPlan, list[int]]:
    """Source blocks 0..n-1 -> destination blocks at random distinct slots of ``dst``."""
    slots = rng.permutation(dst.length // block)[:nblocks].tolist()
    s = tuple(Region(src.addr + i * block, block) for i in range(nblocks))
    d = tuple(Region(dst.addr + j * block, block) for j in slots)
    return TransferPlan(TransferId(tid), s, d), slots


def _connected(make_pair: PairFactory) -> tuple[Transport, Transport, PeerId]:
    snd, rcv = make_pair()
    return snd, rcv, snd.connect(rcv.descriptor())


def _verify(src: Buffer, dst: Buffer, block: int, slots: list[int], what: str) -> None:
    d = dst.array.reshape(-1, block)
    s = src.array.reshape(-1, block)
    for i, j in enumerate(slots):
        if not np.array_equal(s[i], d[j]):
            raise AssertionError(f"{what}: destination block {j} differs from source block {i}")
    untouched = np.ones(len(d), dtype=bool)
    untouched[slots] = False
    if not (d[untouched] == SENTINEL).all():
        raise AssertionError(f"{what}: bytes outside the granted blocks were written")


def _expect(exc: type[BaseException] | tuple[type[BaseException], ...], fn: Callable[[], Any], what: str) -> BaseException:
    try:
        fn()
    except exc as e:
        return e
    except Exception as e:  # noqa: BLE001 - report what came instead
        raise AssertionError(f"{what}: expected {exc}, got {type(e).__name__}: {e}") from e
    raise AssertionError(f"{what}: expected {exc}, but the call succeeded")


def check_round_trip(make_pair: PairFactory) -> None:
    """Random data in block sizes 4 KiB - 4 MiB lands in scattered destination blocks."""
    snd, rcv, peer = _connected(make_pair)
    alive = []  # registered memory stays allocated until close (the transport contract)
    try:
        rng = np.random.default_rng(1)
        for block in (4 * KiB, 64 * KiB, 256 * KiB, 1 * MiB, 4 * MiB):
            n = max(4, (8 * MiB) // block)
            src, dst = Buffer.random(n * block, block), Buffer.filled(2 * n * block)
            alive += [src, dst]
            snd.register([src.region])
            rcv.register([dst.region])
            tid = f"rt-{block}"
            plan, slots = scattered_plan(tid, src.region, dst.region, block, n, rng)
            rcv.grant(tid, plan.dst)
            h = snd.write(peer, plan, notify=b"note-" + tid.encode())
            snd.wait(h, 30)
            res = rcv.wait_recv(tid, 30)
            assert res.nbytes == n * block, f"{tid}: receiver counted {res.nbytes} of {n * block} bytes"
            assert res.notify == b"note-" + tid.encode(), f"{tid}: notify arrived as {res.notify!r}"
            _verify(src, dst, block, slots, tid)
    finally:
        snd.close()
        rcv.close()


def check_concurrent(make_pair: PairFactory, count: int = 128) -> None:
    """``count`` transfers in flight at once, each into its own scattered blocks."""
    snd, rcv, peer = _connected(make_pair)
    try:
        block, per = 16 * KiB, 8
        src = Buffer.random(count * per * block, 2)
        dst = Buffer.filled(2 * count * per * block)
        snd.register([src.region])
        rcv.register([dst.region])
        slots = np.random.default_rng(3).permutation(2 * count * per)[: count * per].tolist()
        handles = []
        for k in range(count):
            tid = f"cc-{k}"
            s = tuple(src.block(k * per + i, block) for i in range(per))
            d = tuple(dst.block(j, block) for j in slots[k * per : (k + 1) * per])
            rcv.grant(tid, d)
            handles.append(snd.write(peer, TransferPlan(TransferId(tid), s, d)))
        for h in handles:
            snd.wait(h, 60)
        for k in range(count):
            assert rcv.wait_recv(f"cc-{k}", 30).nbytes == per * block
        _verify(src, dst, block, slots, "concurrent")
    finally:
        snd.close()
        rcv.close()


def check_refused(make_pair: PairFactory) -> None:
    """Unknown ids and writes outside the grant are refused on both ends, memory untouched,
    and the pair still works afterwards."""
    snd, rcv, peer = _connected(make_pair)
    try:
        block = 64 * KiB
        src, dst = Buffer.random(8 * block, 4), Buffer.filled(8 * block)
        snd.register([src.region])
        rcv.register([dst.region])
        before = len(rcv.rejections)
        plan = TransferPlan(TransferId("nobody-granted-this"), (src.block(0, block),), (dst.block(0, block),))
        _expect(GrantRefused, lambda: snd.wait(snd.write(peer, plan), 10), "write to an unknown transfer id")
        rcv.grant("half", [dst.block(i, block) for i in range(4)])
        s = tuple(src.block(i, block) for i in range(5))
        d = tuple(dst.block(i, block) for i in range(5))
        h = snd.write(peer, TransferPlan(TransferId("half"), s, d))
        _expect(GrantRefused, lambda: snd.wait(h, 10), "write past the end of the grant")
        _expect(GrantRefused, lambda: rcv.wait_recv("half", 10), "receiver side of a refused write")
        assert len(rcv.rejections) >= before + 2, f"rejections not counted: {rcv.rejections}"
        assert (dst.array[4 * block :] == SENTINEL).all(), "memory outside the grant was written"
        plan, slots = scattered_plan("after", src.region, dst.region, block, 8, np.random.default_rng(5))
        dst.array[:] = SENTINEL
        rcv.grant("after", plan.dst)
        snd.wait(snd.write(peer, plan), 10)
        rcv.wait_recv("after", 10)
        _verify(src, dst, block, slots, "transfer after a refusal")
    finally:
        snd.close()
        rcv.close()


def check_revoke_and_timeouts(make_pair: PairFactory) -> None:
    """Revoked grants abort waiters and refuse writes; waits end at their timeout."""
    snd, rcv, peer = _connected(make_pair)
    try:
        block = 64 * KiB
        src, dst = Buffer.random(4 * block, 6), Buffer.filled(4 * block)
        snd.register([src.region])
        rcv.register([dst.region])
        rcv.grant("idle", [dst.region])
        t0 = time.monotonic()
        _expect(TransferTimeout, lambda: rcv.wait_recv("idle", 0.2), "wait_recv with no sender")
        assert time.monotonic() - t0 < 2.0, "wait_recv overran its timeout"
        rcv.revoke("idle")
        _expect(TransferAborted, lambda: rcv.wait_recv("idle", 1), "wait_recv after revoke")
        rcv.grant("gone", [dst.region])
        waiter: list[BaseException] = []
        th = threading.Thread(target=lambda: waiter.append(_expect(TransferAborted, lambda: rcv.wait_recv("gone", 10), "waiter")))
        th.start()
        time.sleep(0.05)
        rcv.revoke("gone")
        th.join(5)
        assert waiter, "a waiter blocked in wait_recv was not woken by revoke"
        plan = TransferPlan(TransferId("gone"), (src.region,), (dst.region,))
        _expect(GrantRefused, lambda: snd.wait(snd.write(peer, plan), 10), "write after revoke")
        assert (dst.array == SENTINEL).all(), "a revoked grant's memory was written"
    finally:
        snd.close()
        rcv.close()


def check_registration(make_pair: PairFactory) -> None:
    """Unregistered sources, grants outside registered memory, and plans that name a
    destination byte twice are refused locally."""
    snd, rcv, peer = _connected(make_pair)
    try:
        src, dst, other = Buffer.random(64 * KiB, 7), Buffer.filled(64 * KiB), Buffer.filled(64 * KiB)
        rcv.register([dst.region])
        plan = TransferPlan(TransferId("unreg"), (src.region,), (dst.region,))
        _expect(RegistrationError, lambda: snd.write(peer, plan), "write from unregistered memory")
        _expect(RegistrationError, lambda: rcv.grant("bad", [other.region]), "grant of unregistered memory")
        snd.register([src.region])
        half = Region(dst.region.addr, 32 * KiB)
        twice = TransferPlan(TransferId("dup"), (src.block(0, 32 * KiB), src.block(1, 32 * KiB)), (half, half))
        _expect(ValueError, lambda: snd.write(peer, twice), "plan naming one destination twice")
    finally:
        snd.close()
        rcv.close()


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def check_close(make_pair: PairFactory) -> None:
    """close() fails pending waits, refuses later calls, and releases threads and fds."""
    time.sleep(0.05)
    threads, fds = threading.active_count(), _fd_count()
    snd, rcv, peer = _connected(make_pair)
    src, dst = Buffer.random(1 * MiB, 8), Buffer.filled(1 * MiB)
    snd.register([src.region])
    rcv.register([dst.region])
    plan, _ = scattered_plan("c1", src.region, dst.region, 64 * KiB, 16, np.random.default_rng(9))
    rcv.grant("c1", plan.dst)
    snd.wait(snd.write(peer, plan), 10)
    rcv.wait_recv("c1", 10)
    rcv.grant("pending", [dst.region])
    errs: list[BaseException] = []
    th = threading.Thread(target=lambda: errs.append(_expect(TransportError, lambda: rcv.wait_recv("pending", 10), "waiter")))
    th.start()
    time.sleep(0.05)
    rcv.close()
    th.join(5)
    assert errs and isinstance(errs[0], (TransportClosed, TransferAborted)), f"waiter after close got {errs}"
    snd.close()
    snd.close()  # idempotent
    _expect(TransportClosed, lambda: snd.write(peer, plan), "write after close")
    _expect(TransportClosed, lambda: rcv.grant("x", [dst.region]), "grant after close")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and (threading.active_count() > threads or _fd_count() > fds):
        time.sleep(0.02)
    assert threading.active_count() <= threads, f"{threading.active_count() - threads} threads left after close"
    assert _fd_count() <= fds, f"{_fd_count() - fds} file descriptors left after close"


def check_peer_death(make_pair: PairFactory, name: str = "", options: dict[str, Any] | None = None) -> None:
    """A peer dying mid-transfer gives the other side a typed error in bounded time."""
    snd, rcv = make_pair()
    in_process = snd.capabilities.same_process_only
    snd.close()
    rcv.close()
    if in_process:
        _peer_death_in_process(make_pair)
    else:
        _receiver_killed(name, options or {})
        _sender_killed(name, options or {})
        _stale_descriptor(name, options or {})


def _peer_death_in_process(make_pair: PairFactory) -> None:
    snd, rcv, peer = _connected(make_pair)
    try:
        src = Buffer.random(4 * MiB, 10)
        snd.register([src.region])
        rcv.close()
        plan = TransferPlan(TransferId("dead"), (src.region,), (src.region,))
        _expect((PeerGone, GrantRefused, TransportClosed), lambda: snd.wait(snd.write(peer, plan), 5), "write to a closed peer")
    finally:
        snd.close()


def _receiver_killed(name: str, options: dict[str, Any]) -> None:
    size = 256 * MiB
    with PeerProcess(name, options) as child:
        dst = child.request("alloc", size=size)
        child.request("grant", tid="big", regions=[[dst["addr"], size]])
        snd = _make(name, options)
        try:
            src = Buffer.random(size, 11)
            snd.register([src.region])
            peer = snd.connect(decode_descriptor(child.request("descriptor")["descriptor"]))
            child.signal(signal.SIGSTOP)
            h = snd.write(peer, TransferPlan(TransferId("big"), (src.region,), (Region(dst["addr"], size),)))
            time.sleep(0.2)
            child.kill()
            t0 = time.monotonic()
            if snd.capabilities.one_sided:
                # approved ahead of time (nixl's offer), the write needs no receiver code: it
                # may have landed while the receiver was stopped - DONE then says so - or it
                # fails with a typed error; either way within the bound, never a hang
                assert h.wait_done(10), "one-sided write to a killed receiver never finished"
                if h.status is not Status.DONE:
                    _expect((PeerGone, TransportError), lambda: snd.wait(h, 1), "sender whose receiver was killed")
            else:
                _expect((PeerGone, TransportError), lambda: snd.wait(h, 10), "sender whose receiver was killed")
            assert time.monotonic() - t0 < 5, "peer death took over 5 s to surface"
        finally:
            snd.close()


def _sender_killed(name: str, options: dict[str, Any]) -> None:
    block, n = 64 * KiB, 4096  # 256 MiB, scattered so nothing coalesces
    rcv = _make(name, options)
    try:
        dst = Buffer.filled(2 * n * block)
        rcv.register([dst.region])
        slots = np.random.default_rng(12).permutation(2 * n)[:n].tolist()
        d = [[dst.region.addr + j * block, block] for j in slots]
        with PeerProcess(name, options) as child:
            src = child.request("alloc", size=n * block, fill="random")
            peer = child.request("connect", descriptor=encode_descriptor(rcv.descriptor()))["peer"]
            rcv.grant("victim", [Region(a, k) for a, k in d])
            s = [[src["addr"] + i * block, block] for i in range(n)]
            child.request("write", peer=peer, tid="victim", src=s, dst=d, wait=False)
            deadline = time.monotonic() + 10
            while rcv.recv_progress("victim")[0] == 0 and time.monotonic() < deadline:
                time.sleep(0.0005)
            child.signal(signal.SIGSTOP)
            _wait_stopped(child.pid, 5)
            # what the sender put on the wire (or copied, on a same-host path) before it
            # stopped lands now; a fast path may have finished the whole transfer by then
            time.sleep(0.2)
            got, granted = rcv.recv_progress("victim")
            child.kill()
            t0 = time.monotonic()
            if got < granted:
                _expect((PeerGone, TransportError), lambda: rcv.wait_recv("victim", 10), "receiver whose sender was killed")
                assert time.monotonic() - t0 < 5, "sender death took over 5 s to surface"
            else:  # the sender had finished before it stopped: the transfer must be whole
                assert rcv.wait_recv("victim", 10).nbytes == granted
    finally:
        rcv.close()


def _wait_stopped(pid: int, limit_s: float) -> None:
    """Return once process ``pid`` is stopped (a signal is delivered asynchronously)."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] in ("T", "t"):
                return
        time.sleep(0.001)
    raise AssertionError(f"process {pid} did not stop within {limit_s}s of SIGSTOP")


def _stale_descriptor(name: str, options: dict[str, Any]) -> None:
    with PeerProcess(name, options) as child:
        old = decode_descriptor(child.request("descriptor")["descriptor"])
    snd = _make(name, options)
    try:
        _expect(ConnectError, lambda: snd.connect(old, timeout=2), "connect to a peer that has exited")
    finally:
        snd.close()


def _make(name: str, options: dict[str, Any]) -> Transport:
    from pdfabric.transports import create

    return create(name, **options)


CHECKS: dict[str, Callable[..., None]] = {
    "round_trip": check_round_trip,
    "concurrent": check_concurrent,
    "refused": check_refused,
    "revoke_and_timeouts": check_revoke_and_timeouts,
    "registration": check_registration,
    "close": check_close,
    "peer_death": check_peer_death,
}


def check_transport(make_pair: PairFactory, *, name: str = "", options: dict[str, Any] | None = None) -> None:
    """Run every conformance check against ``make_pair``."""
    for check_name, fn in CHECKS.items():
        if check_name == "peer_death":
            fn(make_pair, name, options)
        else:
            fn(make_pair)
