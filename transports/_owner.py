"""The thread that owns a library object without internal locking (a NIXL agent, a UCX
worker): every call into that object runs on it.

Other threads ``submit`` work (fire and forget) or ``call`` it (wait for the result, or
its exception). A subclass writes ``_run``: each turn it runs ``_drain()`` (the queued
commands), its own step, and sleeps in ``_ready()`` on ``efd`` (rung by ``wake``) and its
own descriptors. ``stop`` runs a last command on the thread, which then sees ``stopping``
and ends; commands queued after that fail fast with ``TransportClosed``.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import os
import queue
import select
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from pdfabric.errors import TransportClosed

__all__ = ["OwnerThread", "CALL_S"]

log = logging.getLogger("pdfabric.transports")

CALL_S = 60.0  # longest ``call`` before the caller gives up on a stuck owner thread


class OwnerThread:
    """Base of ``_nixl_agent.AgentThread`` and ``_ucx_worker.WorkerLoop``."""

    transport = ""  # "nixl", "ucx": for errors and log lines
    library = ""  # "NIXL", "UCX"

    def __init__(self, name: str) -> None:
        self._cmds: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)

    def _run(self) -> None:
        raise NotImplementedError

    def _stopped(self) -> None:
        """Called once the thread has ended (subclasses drop what it owned)."""

    def start(self) -> None:
        self.thread.start()

    def wake(self) -> None:
        try:
            os.eventfd_write(self._efd, 1)
        except OSError:  # closed: the thread is gone
            pass

    def submit(self, fn: Callable[[], None]) -> None:
        self._cmds.put(fn)
        self.wake()

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the thread; return its result or raise its error."""
        if threading.current_thread() is self.thread:
            return fn()
        fut: cf.Future[Any] = cf.Future()

        def run() -> None:
            if self.stopping:
                fut.set_exception(TransportClosed("transport closed", transport=self.transport))
                return
            try:
                fut.set_result(fn())
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                fut.set_exception(e)

        self.submit(run)
        deadline = time.monotonic() + CALL_S
        while True:
            try:
                return fut.result(0.5)
            except cf.TimeoutError:
                if not self.thread.is_alive() or time.monotonic() > deadline:
                    msg = f"the transport's {self.library} thread is not running"
                    raise TransportClosed(msg, transport=self.transport) from None

    def stop(self, last: Callable[[], None], timeout: float) -> bool:
        """Run ``last`` on the thread, then end it; True when it ended within ``timeout``."""

        def final() -> None:
            self.stopping = True
            last()

        self.submit(final)
        self.thread.join(timeout)
        if self.thread.is_alive():
            return False
        os.close(self._efd)
        self._stopped()
        return True

    def _drain(self) -> bool:
        """Run the queued commands; True when there was one."""
        ran = False
        while True:
            try:
                fn = self._cmds.get_nowait()
            except queue.Empty:
                return ran
            ran = True
            try:
                fn()
            except Exception:
                log.exception("%s: command failed on the %s thread", self.transport, self.library)

    def _ready(self, fds: Sequence[int], seconds: float) -> list[int]:
        """The descriptors of ``fds`` readable within ``seconds``; a ring of ``efd`` is
        consumed. select() takes microseconds; poll() (milliseconds) only for descriptors
        select() cannot take."""
        if max(fds) < 1024:
            ready = list(select.select(fds, (), (), seconds)[0])
        else:
            p = select.poll()
            for fd in fds:
                p.register(fd, select.POLLIN)
            ready = [fd for fd, _ in p.poll(max(1.0, seconds * 1e3))]
        if self._efd in ready:
            try:
                os.eventfd_read(self._efd)
            except BlockingIOError:
                pass
        return ready
