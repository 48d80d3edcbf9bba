"""OwnerThread, the base of the nixl and ucx transports' library threads, on its own."""

from __future__ import annotations

import logging
import os
import threading
import time

import pytest

from pdfabric.errors import TransportClosed
from pdfabric.transports import _owner
from pdfabric.transports._owner import OwnerThread


class Loop(OwnerThread):
    transport, library = "test", "TEST"

    def __init__(self) -> None:
        super().__init__("pdfabric-test-owner")
        self.stopped_called = 0
        self.wakeups = 0

    def _run(self) -> None:
        while True:
            self._drain()
            if self.stopping:
                break
            if self._ready((self._efd,), 5.0):
                self.wakeups += 1
        self._drain()

    def _stopped(self) -> None:
        self.stopped_called += 1


@pytest.fixture
def loop():
    lp = Loop()
    lp.start()
    yield lp
    if lp.thread.is_alive():
        assert lp.stop(lambda: None, 5.0)


def test_call_runs_on_the_owner_thread_and_returns_its_result(loop: Loop) -> None:
    assert loop.call(lambda: threading.current_thread().name) == "pdfabric-test-owner"
    assert loop.call(lambda: 6 * 7) == 42
    # a call from the owner thread itself runs at once (no deadlock on its own queue)
    assert loop.call(lambda: loop.call(lambda: "inner")) == "inner"


def test_call_raises_the_commands_error_in_the_caller(loop: Loop) -> None:
    def boom() -> None:
        raise KeyError("missing")

    with pytest.raises(KeyError, match="missing"):
        loop.call(boom)
    assert loop.call(lambda: "still serving") == "still serving"


def test_a_failing_submitted_command_is_logged_and_the_thread_goes_on(loop: Loop, caplog) -> None:
    caplog.set_level(logging.ERROR, logger="pdfabric.transports")
    loop.submit(lambda: 1 / 0)
    assert loop.call(lambda: "alive") == "alive"
    assert any("test: command failed on the TEST thread" in r.getMessage() for r in caplog.records)


def test_wake_interrupts_the_sleep_and_is_consumed(loop: Loop) -> None:
    before = loop.call(lambda: loop.wakeups)
    t0 = time.monotonic()
    loop.call(lambda: None)  # submit wakes it from a 5 s sleep
    assert time.monotonic() - t0 < 2.0
    assert loop.call(lambda: loop.wakeups) > before
    # the eventfd was read back to zero: nothing is pending on it now
    with pytest.raises(BlockingIOError):
        loop.call(lambda: os.eventfd_read(loop._efd))


def test_stop_runs_the_last_command_on_the_thread_then_fails_later_calls(loop: Loop) -> None:
    ran_on: list[str] = []
    assert loop.stop(lambda: ran_on.append(threading.current_thread().name), 5.0)
    assert ran_on == ["pdfabric-test-owner"]
    assert not loop.thread.is_alive() and loop.stopped_called == 1
    with pytest.raises(TransportClosed, match="TEST thread is not running"):
        loop.call(lambda: None)
    loop.wake()  # its eventfd is closed: a wake is a no-op, not an error


def test_commands_queued_while_stopping_fail_fast_with_transport_closed() -> None:
    lp = Loop()
    lp.start()
    gate = threading.Event()
    results: list[BaseException] = []
    lp.submit(gate.wait)  # holds the thread while we queue stop and a call behind it

    def late_call() -> None:
        try:
            lp.call(lambda: "never")
        except BaseException as e:  # noqa: BLE001 - collected for the assert
            results.append(e)

    stopper = threading.Thread(target=lp.stop, args=(lambda: None, 5.0))
    stopper.start()
    time.sleep(0.1)
    caller = threading.Thread(target=late_call)
    caller.start()
    time.sleep(0.1)
    gate.set()
    stopper.join(5.0)
    caller.join(5.0)
    assert not lp.thread.is_alive()
    assert len(results) == 1 and isinstance(results[0], TransportClosed)
    assert "transport closed" in str(results[0])


def test_a_stuck_owner_thread_makes_call_give_up_after_the_deadline(monkeypatch) -> None:
    monkeypatch.setattr(_owner, "CALL_S", 0.3)
    lp = Loop()
    lp.start()
    gate = threading.Event()
    lp.submit(gate.wait)
    t0 = time.monotonic()
    with pytest.raises(TransportClosed, match="not running"):
        lp.call(lambda: None)
    assert time.monotonic() - t0 < 3.0
    gate.set()
    assert lp.stop(lambda: None, 5.0)
