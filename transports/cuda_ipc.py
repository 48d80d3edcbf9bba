"""``cuda_ipc``: KV blocks between processes on the GPUs of one host, device to device.

Theory of operation
-------------------
*Who copies: the receiver.* The sender never gets a handle to the receiver's memory. At
``register`` the sender finds the allocation of each region and exports its CUDA IPC
handle once (``cudaIpcGetMemHandle``). ``write`` sends PULL frames: rows of (source in the
sender, destination in the receiver, length), plus the handles of the allocations the
sources lie in (``_cuda_ipc_wire``). The receiver checks every destination against its
grant (``GrantTable.begin_write``, Rule 1) before anything moves, maps the handles (once
per connection and allocation), and copies with its own kernel on its own stream. So "a
receiver never lets a peer write outside what it granted" holds by construction - every
byte that lands was written by the receiver's own code, into destinations it checked - not
because the sender behaved. A push design (the receiver exports its whole KV cache and
each sender writes into it after an approval) would map every decode instance's KV cache
writable into every prefill process, and the grant check would be advice a buggy sender
could ignore, as it is for one-sided NIXL writes. The receiver reads only memory the sender
registered, through mappings whose size it checks (``_cuda_ipc_device``).

*Control.* The frames are the stream transports' (``_stream``, ``_wire``): HELLO with the
incarnation check, PULL, END, ACK, ERR, over an abstract Unix socket; the kernel tells the
receiver the sender's pid (``SO_PEERCRED``). Grants, refusals, notifications, timeouts,
peer death (the socket closes when a process dies) behave as for ``tcp`` and ``shm``.
PULL frames carry no payload, so ``write`` sends them from the caller's thread whenever the
connection is idle, and one connection per peer is the default.

*Completion by CUDA events.* Each PULL frame is one kernel launch (``launch``) followed by
an event; the copies of a transfer's frames are queued back to back and the receiver
synchronizes their events (GIL released) when the transfer's END arrives, then counts the
bytes and acknowledges. The sender's handle is DONE on that ACK: the bytes are in place.
Peers across GPUs copy over NVLink (or PCIe peer access) when the GPUs can reach each
other; on one GPU it is a device-local copy between two processes.

*Release order.* The receiver unmaps a connection's handles when the connection ends,
after the copies from them completed. ``close`` on the sender first half-closes every
connection and waits (``release_timeout_s``) until each receiver has closed its side -
which it does after unmapping - so once ``close`` returns no peer maps our memory and the
owner may free it. Then sockets, threads, the stream.

*Peers in one process* (tests, one process driving two GPUs) cannot open their own IPC
handles; the receiver sees its own pid and uses the sender's addresses directly, checked
against the real allocation.

*Memory.* One transport serves one GPU (its first registration's). Registered memory must
come from ``cudaMalloc`` (torch's and cupy's default allocators): memory of
``cudaMallocAsync`` pools or of the virtual memory API (torch's expandable segments) has no
legacy IPC handle and is refused at ``register``, as is host memory.

*Streams of the caller.* Copies run on the receiver's stream, in its process, so they
cannot be ordered after the sender's kernels: the bytes a ``write`` names must be complete
when it is called (synchronize the stream that produced them), and the receiver's granted
blocks are its again - for any stream - once ``wait_recv`` returned.

*Availability.* Importing this module needs no cupy; ``unavailable_reason()`` (used by
the registry) says why it cannot run - cupy missing, no CUDA device - and the constructor
raises ``TransportUnavailable`` with that reason before it opens anything.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from pdfabric.errors import (
    ConnectError,
    RegistrationError,
    TransferAborted,
    TransportError,
)
from pdfabric.memory import Region

from . import _cuda_ipc_wire as cw
from . import _wire as w
from ._cuda_ipc_device import CudaDevice, DeviceOps, Launched, unavailable_reason
from ._iov import iovecs
from ._state import GrantTable
from ._stream import StreamTransport, _ConnCtx
from .base import Capabilities, PeerDescriptor

__all__ = ["CudaIpcTransport", "unavailable_reason"]

log = logging.getLogger("pdfabric.transports")

_EMPTY = np.empty(0, dtype=np.uint64)


@dataclass(eq=False)
class _Mapped:
    """One receiving connection's mapped peer allocations and its copies not yet waited."""

    same_process: bool
    opened: dict[cw.Allocation, int] = field(default_factory=dict)  # as announced -> base here
    pending: list[tuple[Launched, object, int, str]] = field(default_factory=list)  # copy, token, bytes, tid


class CudaIpcTransport(StreamTransport):
    """Same-host GPU transport: CUDA IPC handles, device-to-device copies by the receiver."""

    name = "cuda_ipc"
    capabilities = Capabilities(push=True, device_memory=True, same_host_only=True)
    data_frame = w.FrameType.PULL
    inline_bytes = 1 << 62  # frames carry no payload: send from the caller's thread when idle

    def __init__(
        self,
        *,
        device: int | None = None,
        copy_kernel: bool = True,
        streams: int = 1,
        connect_timeout_s: float = 5.0,
        transfer_timeout_s: float = 30.0,
        release_timeout_s: float = 5.0,
    ) -> None:
        # first: a machine without cupy or a GPU is refused before any socket or thread exists
        self._dev: DeviceOps = self._make_device(device, copy_kernel)
        self.release_timeout_s = release_timeout_s
        self._alloc_lock = threading.Lock()
        self._allocs: dict[int, cw.Allocation] = {}  # by base
        # sorted starts, ends, packed rows: swapped as one tuple, read without a lock
        self._alloc_index: tuple[np.ndarray, np.ndarray, list[bytes]] = (_EMPTY, _EMPTY, [])
        self._maps: dict[int, _Mapped] = {}
        self._maps_lock = threading.Lock()
        super().__init__(streams=streams, connect_timeout_s=connect_timeout_s, transfer_timeout_s=transfer_timeout_s)

    def _make_device(self, device: int | None, copy_kernel: bool) -> DeviceOps:
        return CudaDevice(device, copy_kernel)

    # -- memory ---------------------------------------------------------------------------
    def register(self, regions: Sequence[Region]) -> None:
        """Register device memory; finds (and exports) the allocation of every region."""
        self._check_open()
        found: list[cw.Allocation] = []
        for r in regions:
            if r.length <= 0:
                raise RegistrationError(f"cannot register an empty region at {r.addr:#x}", transport=self.name)
            addr = r.addr
            while addr < r.end:  # a region may span allocations that happen to be adjacent
                a = self._dev.locate(addr, r.end)
                if not a.base <= addr < a.end:
                    raise RegistrationError(f"CUDA reports allocation {a.base:#x}+{a.size} for {addr:#x}", transport=self.name)
                self._dev.bind(a.device)
                found.append(a)
                addr = a.end
        self._add_allocations(found)
        super().register(regions)

    def _add_allocations(self, found: list[cw.Allocation]) -> None:
        with self._alloc_lock:
            for a in found:
                # an allocation freed and replaced: forget the old one (it overlaps)
                for base in [b for b, old in self._allocs.items() if old.base < a.end and a.base < old.end]:
                    del self._allocs[base]
                self._allocs[a.base] = a
            allocs = sorted(self._allocs.values(), key=lambda a: a.base)
            self._alloc_index = (
                np.array([a.base for a in allocs], dtype=np.uint64),
                np.array([a.end for a in allocs], dtype=np.uint64),
                [a.pack() for a in allocs],
            )

    # -- sockets --------------------------------------------------------------------------
    def _listen(self) -> tuple[socket.socket, str]:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        name = f"pdfabric-cuda-ipc-{self._incarnation}"
        sock.bind("\0" + name)
        sock.listen(128)
        return sock, f"unix:@{name}"

    def descriptor(self) -> PeerDescriptor:
        d = super().descriptor()
        return PeerDescriptor(d.transport, d.incarnation, "localhost", d.pid, d.endpoint, d.host_id)

    def _dial(self, peer: PeerDescriptor, timeout: float) -> socket.socket:
        from .registry import local_host_id

        if peer.host_id != local_host_id():
            raise ConnectError(
                f"cuda_ipc needs both ends on one host; peer is on {peer.host_id or 'an unknown host'}",
                transport=self.name,
            )
        if not peer.endpoint.startswith("unix:@"):
            raise ConnectError(f"not a cuda_ipc endpoint: {peer.endpoint!r}", transport=self.name)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect("\0" + peer.endpoint[len("unix:@") :])
        except OSError:
            sock.close()
            raise
        return sock

    def _peer_pid(self, sock: socket.socket, claimed: int) -> int:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid: int = struct.unpack("3i", creds)[0]
        return pid

    # -- sender: frames -------------------------------------------------------------------
    def _frames(self, tid: bytes, part: np.ndarray) -> bytes:
        """PULL frames for ``part``, each naming the allocations its sources lie in."""
        starts, ends, packed = self._alloc_index
        rows, idx = cw.split_rows(starts, ends, part)
        out = []
        for i in range(0, len(rows), w.MAX_SEGMENTS):
            chunk, used = rows[i : i + w.MAX_SEGMENTS], idx[i : i + w.MAX_SEGMENTS]
            allocs = [packed[k] for k in np.unique(used[used >= 0]).tolist()]
            out.append(w.header(w.FrameType.PULL, tid, len(chunk), int(chunk[:, 2].sum())) + cw.pack_pull(allocs, chunk))
        return b"".join(out)

    def _encode(self, tid: bytes, part: np.ndarray, end: bytes) -> tuple[np.ndarray, list[object]]:
        buf = np.frombuffer(self._frames(tid, part) + end, dtype=np.uint8)
        return iovecs(np.array([buf.ctypes.data]), np.array([len(buf)])), [buf]

    def _encode_small(self, tid: bytes, part: np.ndarray, end: bytes) -> list[bytes | memoryview]:
        return [self._frames(tid, part) + end]

    # -- receiver -------------------------------------------------------------------------
    def _receive(self, ctx: _ConnCtx, tid: str, count: int, body_len: int) -> None:
        allocs, rows = cw.read_pull(ctx.reader.read, count, body_len)
        token = self._grants.begin_write(tid, rows[:, 1:3], ctx.peer, ctx)  # Rule 1; GrantRefused
        m = self._mapped(ctx)
        try:
            if GrantTable.cancelled(token):
                raise TransferAborted("grant ended before the copy started", transfer_id=tid)
            src, direct = self._sources(m, allocs, rows)
            job = self._dev.launch(np.stack([src, rows[:, 1], rows[:, 2]], axis=1), ctx.pid, direct)
        except TransferAborted:
            self._grants.end_write(token, ctx, 0)  # revoked or failed meanwhile; the grant says why
            return
        except Exception as e:  # the write must end whatever failed: revoke waits for it
            self._grants.end_write(token, ctx, 0)
            err = e if isinstance(e, TransportError) else TransportError(f"copy failed: {type(e).__name__}: {e}")
            err.transfer_id, err.peer, err.transport = tid, ctx.peer, self.name
            self._grants.fail(tid, err)
            if err is e:
                raise
            raise err from e
        m.pending.append((job, token, body_len, tid))

    def _sources(self, m: _Mapped, allocs: list[cw.Allocation], rows: np.ndarray) -> tuple[np.ndarray, bool]:
        """Sender addresses -> ours, through the frame's allocations (mapped on first use);
        and whether our device can read them all directly."""
        local = []
        for a in allocs:
            base = m.opened.get(a)
            if base is None:
                base = m.opened[a] = self._dev.open(a, m.same_process)  # FrameError
            local.append(base)
        order = sorted(range(len(allocs)), key=lambda k: allocs[k].base)
        src = cw.map_sources(
            np.array([allocs[k].base for k in order], dtype=np.uint64),
            np.array([allocs[k].size for k in order], dtype=np.uint64),
            np.array([local[k] for k in order], dtype=np.uint64),
            rows[:, 0],
            rows[:, 2],
        )
        direct = not m.same_process or all(a.device == self._dev.index for a in allocs)
        return src, direct

    def _mapped(self, ctx: _ConnCtx) -> _Mapped:
        with self._maps_lock:
            m = self._maps.get(id(ctx))
            if m is None:
                m = self._maps[id(ctx)] = _Mapped(same_process=ctx.pid == os.getpid())
            return m

    def _settle(self, ctx: _ConnCtx) -> None:
        """Wait for the connection's queued copies; count what landed (or fail the grant)."""
        with self._maps_lock:
            m = self._maps.get(id(ctx))
        if m is None:
            return
        pending, m.pending = m.pending, []
        for job, token, nbytes, tid in pending:
            got = 0
            try:
                job.wait()
                got = nbytes
            except Exception as e:  # noqa: BLE001 - TransportError from the device layer
                err = e if isinstance(e, TransportError) else TransportError(f"copy failed: {type(e).__name__}: {e}")
                err.transfer_id, err.peer, err.transport = tid, ctx.peer, self.name
                self._grants.fail(tid, err)
            finally:
                self._grants.end_write(token, ctx, got)

    def _on_end(self, ctx: _ConnCtx, tid: str, body: bytes) -> None:
        self._settle(ctx)  # the transfer's bytes are in place before END is counted and acknowledged
        super()._on_end(ctx, tid, body)

    def _serve_frames(self, ctx: _ConnCtx) -> None:
        try:
            super()._serve_frames(ctx)
        finally:
            # before the connection closes: the sender's close() waits for exactly this
            self._settle(ctx)
            self._unmap(ctx)

    def _unmap(self, ctx: _ConnCtx) -> None:
        with self._maps_lock:
            m = self._maps.pop(id(ctx), None)
        if m is None:
            return
        for a in m.opened:
            try:
                self._dev.close(a, m.same_process)
            except TransportError as e:
                log.warning("cuda_ipc: releasing a peer mapping failed: %s", e)

    # -- lifecycle ------------------------------------------------------------------------
    def close(self) -> None:
        if self._closed:
            return
        self._let_go()
        super().close()

    def _let_go(self) -> None:
        """Half-close every connection we send on and wait until each receiver closed its
        side, which it does after unmapping our memory (see the module docstring)."""
        with self._links_lock:
            streams = [s for link in self._links.values() for s in link.streams if s is not None and s.dead is None]
        for s in streams:
            try:
                s.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        deadline = time.monotonic() + self.release_timeout_s
        for s in streams:
            reader = s.threads[1] if len(s.threads) > 1 else None
            if reader is None or reader is threading.current_thread():
                continue
            reader.join(max(0.0, deadline - time.monotonic()))
            if reader.is_alive():
                log.warning("cuda_ipc: %s did not release our memory within %.3gs; closing anyway", s.label, self.release_timeout_s)

    def _on_close(self) -> None:
        self._dev.shutdown()
        with self._maps_lock:
            left = list(self._maps)
        if left:
            log.warning("cuda_ipc: %d connection(s) still hold peer mappings after close", len(left))
