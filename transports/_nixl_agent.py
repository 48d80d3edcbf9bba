"""Plumbing of the ``nixl`` transport: the thread that owns a NIXL agent, process watching,
and the boundary where NIXL's exceptions become ours.

``AgentThread`` runs every NIXL call of one agent on one thread (NIXL agents made without a
listener thread have no internal locking). Other threads ``submit`` work (fire and forget)
or ``call`` it (wait for the result). Between commands the thread runs ``step()`` and, when
that found nothing to do, sleeps for an interval that grows by half each idle round up to
``cap()`` - and wakes at once on new work (an eventfd) or when its ``Doorbell`` rings.

NIXL offers no file descriptor to wait on for notifications, so a sleeping agent would
only see them at its next poll. A ``Doorbell`` is an abstract Unix datagram socket: a
same-host peer sends one byte to it right after each notification, so the receiving
thread can sleep in ``poll()`` and still answer within a wake-up. Peers on other hosts (or
network namespaces) cannot ring; they are polled for instead.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import socket
import sys
from typing import Any, Callable

import nixl  # noqa: F401 - an ImportError here is how the registry learns nixl is missing
import nixl._bindings as nb
from nixl._api import nixl_agent, nixl_agent_config

from pdfabric.errors import PeerGone, TransportError, TransportUnavailable

from ._owner import OwnerThread
from ._procs import PidWatch, namespace, proc_start, why

__all__ = [
    "NIXL_ERRORS",
    "AgentThread",
    "Doorbell",
    "PidWatch",
    "make_agent",
    "as_text",
    "empty_reg_list",
    "nixl_error",
    "why",
    "proc_start",
    "memory_kind",
]

log = logging.getLogger("pdfabric.transports")

NIXL_ERRORS: tuple[type[BaseException], ...] = tuple(
    getattr(nb, n) for n in dir(nb) if n.startswith("nixl") and n.endswith("Error")
)


def make_agent(name: str, backend: str, progress_thread: bool, error_handling: str) -> Any:
    """A NIXL agent with one backend; TransportUnavailable when NIXL cannot start it."""
    _route_nixl_logs()
    try:
        agent = nixl_agent(name, nixl_agent_config(enable_prog_thread=progress_thread, backends=[]))
        agent.create_backend(backend, {"ucx_error_handling_mode": error_handling})
    except NIXL_ERRORS + (RuntimeError,) as e:
        raise TransportUnavailable(f"NIXL could not start a {backend} agent: {why(e)}", transport="nixl") from e
    return agent


def empty_reg_list() -> Any:
    """An empty registration list (for connection-only metadata)."""
    return nb.nixlRegDList(nb.DRAM_SEG)


class AgentThread(OwnerThread):
    """The one thread that calls into an agent; see the module docstring."""

    transport, library = "nixl", "NIXL"

    def __init__(self, name: str, step: Callable[[], bool], cap: Callable[[], float], hot_s: float, bell: "Doorbell") -> None:
        super().__init__(name)
        self._step, self._cap, self._hot_s, self._bell = step, cap, hot_s, bell

    def _run(self) -> None:
        interval = self._hot_s
        while True:
            busy = self._drain()
            if self.stopping:
                break
            try:
                busy |= self._step()
            except Exception:  # one bad message must not stop the data path
                log.exception("nixl: unexpected error on the NIXL thread")
            if busy:
                interval = self._hot_s
                continue
            interval = min(self._cap(), interval * 1.5)
            if self._ready((self._efd, self._bell.fileno()), interval):
                self._bell.drain()
                interval = self._hot_s  # rung: what it announced may still be on its way
        self._drain()  # commands queued meanwhile see ``stopping`` and fail fast


class Doorbell:
    """An abstract Unix datagram socket peers on this host ring after each notification."""

    def __init__(self, tag: str) -> None:
        self.name = f"pdfabric-nixl-{tag}"
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        self._sock.bind("\0" + self.name)
        self.netns = namespace("net")

    def fileno(self) -> int:
        return self._sock.fileno()

    def ring(self, name: str) -> None:
        try:
            self._sock.sendto(b"!", "\0" + name)
        except OSError:  # full (it is awake anyway) or gone (its death is noticed elsewhere)
            pass

    def drain(self) -> None:
        try:
            while self._sock.recv(64):
                pass
        except OSError:
            pass

    def close(self) -> None:
        self._sock.close()


def as_text(name: str | bytes) -> str:
    """An agent name as NIXL returns it (bytes from add_remote_agent) -> str."""
    return name.decode() if isinstance(name, bytes) else name


def nixl_error(e: BaseException, what: str) -> TransportError:
    """A NIXL exception as one of ours (wrapped here, once)."""
    if isinstance(e, nb.nixlRemoteDisconnectError):
        return PeerGone(f"{what}: the peer disconnected ({why(e)})", transport="nixl")
    return TransportError(f"{what}: {why(e)}", transport="nixl")


@functools.cache
def _route_nixl_logs() -> None:
    """NIXL's Python wrapper logs INFO lines to *stdout*, which corrupts stdout protocols
    (child peers, JSON output); its records go through the root logger instead."""
    lg = logging.getLogger("nixl")
    for h in list(lg.handlers):
        if isinstance(h, logging.StreamHandler) and getattr(h, "stream", None) is sys.stdout:
            lg.removeHandler(h)
    lg.propagate = True
    lg.setLevel(logging.WARNING)


@functools.cache
def _libcuda() -> Any:
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    lib.cuPointerGetAttribute.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint64]
    return lib if lib.cuInit(0) == 0 else None


def memory_kind(addr: int) -> tuple[int, int]:
    """(0, 0) for host memory; (1, device ordinal) for CUDA device memory."""
    lib = _libcuda()
    if lib is None:
        return 0, 0
    mtype, dev = ctypes.c_uint(0), ctypes.c_int(0)
    # CU_POINTER_ATTRIBUTE_MEMORY_TYPE (2) == CU_MEMORYTYPE_DEVICE (2)
    if lib.cuPointerGetAttribute(ctypes.byref(mtype), 2, addr) != 0 or mtype.value != 2:
        return 0, 0
    lib.cuPointerGetAttribute(ctypes.byref(dev), 9, addr)  # CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL
    return 1, dev.value
