"""Circuit breaker of the remote tiers: open, half-open probe, back-off, quiet warnings."""

from __future__ import annotations

import logging

import pytest

from pdfabric.cache.breaker import Breaker


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_open_probe_close(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    b = Breaker("redis x", logging.getLogger("test.breaker"), backoff_s=1.0, max_backoff_s=4.0, clock=clock)
    assert b.allow()
    with caplog.at_level(logging.INFO, logger="test.breaker"):
        b.failure(ConnectionError("refused"))
        assert not b.allow() and b.is_open
        clock.now += 1.01
        assert b.allow()  # the one probe
        assert not b.allow()  # others wait while it runs
        b.failure(ConnectionError("refused"))  # back-off doubles: 2 s
        clock.now += 1.5
        assert not b.allow()
        clock.now += 0.6
        assert b.allow()
        b.success()
        assert b.allow() and not b.is_open
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "redis x failed: ConnectionError: refused" in warnings[0].getMessage()
    assert any("reachable again" in r.getMessage() for r in caplog.records)
    assert b.failures == 2


def test_backoff_is_capped_and_warnings_rate_limited(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    b = Breaker("s3 y", logging.getLogger("test.breaker2"), backoff_s=1.0, max_backoff_s=4.0,
                warn_every_s=10.0, clock=clock)  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="test.breaker2"):
        for _ in range(6):
            b.failure(TimeoutError("slow"))
            clock.now += 4.01
            assert b.allow()
        clock.now += 10
        b.failure(TimeoutError("slow"))
    msgs = [r.getMessage() for r in caplog.records]  # failures at t=0, 4, 8, 12, 16, 20, 34
    assert len(msgs) == 3  # t=0, t=12 and t=34: one per 10 s at most
    assert "not logged" not in msgs[0]
    assert "(2 similar failures not logged)" in msgs[1] and "(2 similar failures not logged)" in msgs[2]
    assert "for 4.0s" in msgs[2]
