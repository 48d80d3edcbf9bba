"""Fixtures for the routing-proxy tests: a background event loop, and proxies in front of
fake engines on real loopback sockets (``pdfabric.testing.fake_engine``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from proxy_harness import BackgroundLoop, Stack


@pytest.fixture
def bg() -> Iterator[BackgroundLoop]:
    """An event loop (uvloop, like ``pdfabric proxy``) on a thread of its own."""
    loop = BackgroundLoop()
    try:
        yield loop
    finally:
        loop.close()


@pytest.fixture
def make_stack(bg: BackgroundLoop) -> Iterator[Callable[..., Stack]]:
    """``make_stack(prefills=2, decodes=1, engine=dict(...), **ProxySettings fields)``:
    fake engines plus a proxy in front of them; everything is stopped after the test."""
    stacks: list[Stack] = []

    def make(**kwargs: object) -> Stack:
        s = Stack.start(bg, **kwargs)  # type: ignore[arg-type]
        stacks.append(s)
        return s

    try:
        yield make
    finally:
        for s in stacks:
            s.stop()
