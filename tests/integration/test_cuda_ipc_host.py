"""The cuda_ipc transport's protocol on host memory: conformance, forged frames, release order.

CI has no GPU. ``HostCudaIpc`` is ``CudaIpcTransport`` with its CUDA layer (``DeviceOps``)
swapped for host memory: an allocation's "handle" names its owner's pid and range, mapping
it is the identity, and the receiver copies with ``process_vm_readv`` (memmove within one
process) where the GPU would run its copy kernel. Everything else - PULL frames with their
allocations, grants, refusals, notifications, peer death, the release handshake of
``close`` - is the transport's own code. The GPU itself is covered by ``tests/gpu``.

Child processes (peer-death checks) run this module (``python -m test_cuda_ipc_host``), so
they build the same class.
"""

from __future__ import annotations

import collections
import ctypes
import functools
import os
import socket
import struct
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pdfabric.errors import FrameError, GrantRefused, RegistrationError
from pdfabric.memory import Region, region_of
from pdfabric.testing import CHECKS, PeerProcess, conformance, decode_descriptor
from pdfabric.testing.peer import Child, main
from pdfabric.transports import TransferId, TransferPlan, registry
from pdfabric.transports import _cuda_ipc_wire as cw
from pdfabric.transports import _wire as w
from pdfabric.transports._iov import cma_read, iovecs
from pdfabric.transports.cuda_ipc import CudaIpcTransport

HERE = Path(__file__).resolve().parent
MODULE = Path(__file__).stem
KiB = 1024
_libc = ctypes.CDLL(None, use_errno=True)


class _Done:
    def wait(self) -> None:
        pass


class HostDevice:
    """``DeviceOps`` on host memory (see the module docstring); counts mapped handles."""

    def __init__(self) -> None:
        self.index: int | None = None
        self.opened: collections.Counter[bytes] = collections.Counter()
        self.lock = threading.Lock()

    def locate(self, addr: int, end: int) -> cw.Allocation:
        handle = struct.pack("<qQQ", os.getpid(), addr, end - addr).ljust(cw.HANDLE_BYTES, b"\0")
        return cw.Allocation(addr, end - addr, 0, handle)

    def bind(self, device: int) -> None:
        self.index = device

    def open(self, alloc: cw.Allocation, same_process: bool) -> int:
        with self.lock:
            self.opened[alloc.handle] += 1
        return alloc.base

    def close(self, alloc: cw.Allocation, same_process: bool) -> None:
        with self.lock:
            self.opened[alloc.handle] -= 1
            if not self.opened[alloc.handle]:
                del self.opened[alloc.handle]

    def launch(self, rows: np.ndarray, src_pid: int, direct: bool) -> _Done:
        if src_pid == os.getpid():
            for src, dst, n in rows.tolist():
                ctypes.memmove(dst, src, n)
        else:
            cma_read(src_pid, iovecs(rows[:, 0], rows[:, 2]), iovecs(rows[:, 1], rows[:, 2]))
        return _Done()

    def shutdown(self) -> None:
        pass


class HostCudaIpc(CudaIpcTransport):
    def _make_device(self, device: int | None, copy_kernel: bool) -> HostDevice:  # type: ignore[override]
        _libc.prctl(0x59616D61, ctypes.c_ulong(-1).value, 0, 0, 0)  # PR_SET_PTRACER_ANY (Yama)
        return HostDevice()


class HostChild(Child):
    def mapped(self) -> dict[str, Any]:
        return {"handles": len(self.t._dev.opened)}  # type: ignore[attr-defined]


def _pair() -> tuple[HostCudaIpc, HostCudaIpc]:
    return HostCudaIpc(), HostCudaIpc()


@pytest.fixture
def children(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``create("cuda_ipc")`` and conformance's child processes build ``HostCudaIpc``."""
    monkeypatch.setitem(registry.TRANSPORTS, "cuda_ipc", (HostCudaIpc.__module__, "HostCudaIpc", ""))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setattr(conformance, "PeerProcess", functools.partial(PeerProcess, module=MODULE))


@pytest.mark.parametrize("check", list(CHECKS))
def test_conformance(check: str, children: None) -> None:
    if check == "peer_death":
        CHECKS[check](_pair, "cuda_ipc", {})
    else:
        CHECKS[check](_pair)


@pytest.fixture
def pair() -> Iterator[tuple[HostCudaIpc, HostCudaIpc, np.ndarray, np.ndarray]]:
    snd, rcv = _pair()
    src = np.random.default_rng(0).integers(0, 256, 256 * KiB, dtype=np.uint8)
    dst = np.full(256 * KiB, 0xA5, dtype=np.uint8)
    rcv.register([region_of(dst)])
    try:
        yield snd, rcv, src, dst
    finally:
        snd.close()
        rcv.close()


def test_source_running_across_two_allocations_is_cut_at_the_boundary(pair) -> None:  # type: ignore[no-untyped-def]
    snd, rcv, src, dst = pair
    a, b = region_of(src[: 128 * KiB]), region_of(src[128 * KiB :])
    snd.register([a, b])  # two "allocations" that touch; the plan's one piece spans both
    peer = snd.connect(rcv.descriptor())
    d = Region(region_of(dst).addr + 64 * KiB, 128 * KiB)
    rcv.grant("across", [d])
    snd.wait(snd.write(peer, TransferPlan(TransferId("across"), (Region(a.addr + 64 * KiB, 128 * KiB),), (d,))), 10)
    assert rcv.wait_recv("across", 10).nbytes == 128 * KiB
    assert np.array_equal(dst[64 * KiB : 192 * KiB], src[64 * KiB : 192 * KiB])
    assert (dst[: 64 * KiB] == 0xA5).all() and (dst[192 * KiB :] == 0xA5).all()


def test_sender_close_returns_after_the_receiver_let_go_of_its_memory(pair) -> None:  # type: ignore[no-untyped-def]
    snd, rcv, src, dst = pair
    snd.register([region_of(src)])
    peer = snd.connect(rcv.descriptor())
    rcv.grant("t", [region_of(dst)])
    snd.wait(snd.write(peer, TransferPlan(TransferId("t"), (region_of(src),), (region_of(dst),))), 10)
    rcv.wait_recv("t", 10)
    assert rcv._dev.opened, "the receiver never mapped the sender's allocation"
    snd.close()
    assert not rcv._dev.opened, f"receiver still maps {len(rcv._dev.opened)} allocation(s) after the sender closed"


def test_cross_process_round_trip_and_release(children: None) -> None:
    snd = HostCudaIpc()
    try:
        with PeerProcess("cuda_ipc", {}, module=MODULE) as child:
            size, block = 4 << 20, 64 * KiB
            src = np.random.default_rng(3).integers(0, 256, size, dtype=np.uint8)
            snd.register([region_of(src)])
            dst = child.request("alloc", size=2 * size)["addr"]
            peer = snd.connect(decode_descriptor(child.request("descriptor")["descriptor"]))
            slots = np.random.default_rng(4).permutation(2 * size // block)[: size // block].tolist()
            d = [[dst + j * block, block] for j in slots]
            child.request("grant", tid="x", regions=d)
            s = tuple(Region(region_of(src).addr + i * block, block) for i in range(len(slots)))
            snd.wait(snd.write(peer, TransferPlan(TransferId("x"), s, tuple(Region(a, n) for a, n in d))), 10)
            assert child.request("wait_recv", tid="x")["nbytes"] == size
            for i in (0, len(slots) // 2, len(slots) - 1):
                want = __import__("hashlib").sha256(src[i * block : (i + 1) * block]).hexdigest()
                assert child.request("digest", addr=d[i][0], size=block)["sha256"] == want, f"block {i}"
            assert child.request("mapped")["handles"] == 1
            snd.close()
            assert child.request("mapped")["handles"] == 0, "receiver kept our mapping after close() returned"
    finally:
        snd.close()


def _raw_sender(rcv: HostCudaIpc) -> socket.socket:
    """A hand-driven connection: HELLO done, ready for forged frames."""
    desc = rcv.descriptor()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5)
    sock.connect("\0" + desc.endpoint[len("unix:@") :])
    body = w.Hello.pack(desc.incarnation, "f" * 32, os.getpid())
    sock.sendall(w.header(w.FrameType.HELLO, b"", 0, len(body)) + body)
    hdr = w.recv_header(sock)
    assert hdr is not None and hdr[0] is w.FrameType.HELLO_OK
    return sock


def _err(sock: socket.socket) -> str:
    hdr = w.recv_header(sock)
    assert hdr is not None and hdr[0] is w.FrameType.ERR, hdr
    return bytes(w.recv_exact(sock, hdr[3]))[1:].decode()


def test_source_outside_the_announced_allocations_is_refused(pair) -> None:  # type: ignore[no-untyped-def]
    _, rcv, src, dst = pair
    rcv.grant("forged", [region_of(dst)])
    sock = _raw_sender(rcv)
    try:
        base = region_of(src).addr
        alloc = cw.Allocation(base, 64 * KiB, 0, b"h" * cw.HANDLE_BYTES)
        rows = np.array([[base + 128 * KiB, region_of(dst).addr, dst.nbytes]], dtype=np.uint64)
        frame = w.header(w.FrameType.PULL, b"forged", 1, dst.nbytes) + cw.pack_pull([alloc.pack()], rows)
        sock.sendall(frame)
        assert "not inside an allocation the frame announced" in _err(sock)
    finally:
        sock.close()
    with pytest.raises(FrameError, match="not inside an allocation"):
        rcv.wait_recv("forged", 5)
    assert (dst == 0xA5).all()
    assert any("not inside an allocation" in r.reason for r in rcv.rejections)


def test_frame_of_another_format_is_refused(pair) -> None:  # type: ignore[no-untyped-def]
    _, rcv, _, dst = pair
    sock = _raw_sender(rcv)
    try:
        sock.sendall(w.header(w.FrameType.PULL, b"t", 0, 0) + bytes([cw.FORMAT + 1, 0, 0, 0]))
        assert f"format {cw.FORMAT + 1}" in _err(sock)
    finally:
        sock.close()
    assert (dst == 0xA5).all()


def test_destination_outside_the_grant_never_reaches_the_copy(pair) -> None:  # type: ignore[no-untyped-def]
    snd, rcv, src, dst = pair
    copies: list[int] = []
    launch = rcv._dev.launch
    rcv._dev.launch = lambda rows, pid, direct: (copies.append(len(rows)), launch(rows, pid, direct))[1]  # type: ignore[method-assign]
    snd.register([region_of(src)])
    peer = snd.connect(rcv.descriptor())
    base = region_of(dst).addr
    rcv.grant("g", [Region(base, 64 * KiB)])
    plan = TransferPlan(TransferId("g"), (Region(region_of(src).addr, 128 * KiB),), (Region(base, 128 * KiB),))
    with pytest.raises(GrantRefused, match="outside the grant"):
        snd.wait(snd.write(peer, plan), 10)
    assert copies == [] and (dst == 0xA5).all()


def test_register_refuses_memory_the_device_layer_refuses(pair) -> None:  # type: ignore[no-untyped-def]
    snd, _, src, _ = pair

    def host_memory(addr: int, end: int) -> cw.Allocation:
        raise RegistrationError(f"memory at {addr:#x} is host memory")

    snd._dev.locate = host_memory  # type: ignore[method-assign]
    with pytest.raises(RegistrationError, match="host memory"):
        snd.register([region_of(src)])


if __name__ == "__main__":  # a conformance child: python -m test_cuda_ipc_host --transport cuda_ipc
    registry.TRANSPORTS["cuda_ipc"] = ("__main__", "HostCudaIpc", "")
    sys.exit(main(HostChild))
