"""Every transport passes every conformance check (real sockets / processes on this host)."""

from __future__ import annotations

from typing import Any

import pytest

from pdfabric.testing import CHECKS
from pdfabric.transports import Transport, create
from pdfabric.transports.loopback import LoopbackHub

TRANSPORTS: dict[str, dict[str, Any]] = {
    "loopback": {},
    "tcp": {"streams": 2},
    "tcp-1stream": {"streams": 1},
    "shm": {},
}


def _factory(variant: str):
    name = variant.split("-")[0]
    options = dict(TRANSPORTS[variant])

    def make_pair() -> tuple[Transport, Transport]:
        if name == "loopback":
            hub = LoopbackHub()
            return create(name, hub=hub, **options), create(name, hub=hub, **options)
        return create(name, **options), create(name, **options)

    return name, options, make_pair


@pytest.mark.parametrize("check", list(CHECKS))
@pytest.mark.parametrize("variant", list(TRANSPORTS))
def test_conformance(variant: str, check: str) -> None:
    name, options, make_pair = _factory(variant)
    if check == "peer_death":
        CHECKS[check](make_pair, name, options)
    else:
        CHECKS[check](make_pair)
