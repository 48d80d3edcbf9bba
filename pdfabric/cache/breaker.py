"""A circuit breaker with a rate-limited warning, for remote tiers (Redis, S3).

Theory of operation
-------------------
A remote store that is down must cost the caller at most one bounded timeout, not one
per call. After a failure the breaker *opens* for ``backoff`` seconds: calls are answered
at once (UNAVAILABLE) without touching the network. When the back-off has passed, one
caller is let through (*half-open*); success closes the breaker, failure opens it again
with the back-off doubled, up to ``max_backoff_s``.

Failures are logged at WARNING at most once per ``warn_every_s`` per breaker (with how
many were suppressed meanwhile); recovery is logged at INFO.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

__all__ = ["Breaker"]


class Breaker:
    """Thread-safe; ``clock`` is injectable for tests."""

    def __init__(
        self,
        what: str,
        logger: logging.Logger,
        *,
        backoff_s: float = 1.0,
        max_backoff_s: float = 30.0,
        warn_every_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.what = what
        self._log = logger
        self._base = backoff_s
        self._max = max_backoff_s
        self._warn_every = warn_every_s
        self._clock = clock
        self._lock = threading.Lock()
        self._backoff = backoff_s
        self._open_until = 0.0
        self._probing = False
        self._failing = False
        self._last_warn = -float("inf")
        self._suppressed = 0
        self.failures = 0

    @property
    def is_open(self) -> bool:
        with self._lock:
            return self._failing and self._clock() < self._open_until

    def allow(self) -> bool:
        """May a call go to the backend now? (False while open or while another probes.)"""
        with self._lock:
            if not self._failing:
                return True
            if self._clock() < self._open_until or self._probing:
                return False
            self._probing = True
            return True

    def success(self) -> None:
        with self._lock:
            if not self._failing:
                return
            self._failing = self._probing = False
            self._backoff = self._base
        self._log.info("%s is reachable again; resuming", self.what)

    def failure(self, exc: BaseException) -> None:
        """Open the breaker and warn (rate-limited)."""
        now = self._clock()
        with self._lock:
            self.failures += 1
            if self._failing:
                self._backoff = min(self._backoff * 2, self._max)
            self._failing, self._probing = True, False
            self._open_until = now + self._backoff
            backoff = self._backoff
            if now - self._last_warn < self._warn_every:
                self._suppressed += 1
                return
            self._last_warn, suppressed, self._suppressed = now, self._suppressed, 0
        more = f" ({suppressed} similar failures not logged)" if suppressed else ""
        self._log.warning(
            "%s failed: %s: %s; answering cache misses for %.1fs before retrying%s",
            self.what, type(exc).__name__, exc, backoff, more,
        )  # fmt: skip
