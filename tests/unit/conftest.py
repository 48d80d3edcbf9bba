"""Fixtures shared by the unit tests."""

from __future__ import annotations

from typing import Iterator

import pytest
from grant_helpers import Receiver


@pytest.fixture
def rx() -> Iterator[Receiver]:
    """A GrantTable over one registered buffer; closed after the test."""
    r = Receiver()
    yield r
    r.table.close()
