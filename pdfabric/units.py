"""Byte sizes: the one parser for "4GiB"-style values, and a formatter."""

from __future__ import annotations

import re
from fractions import Fraction

__all__ = ["parse_size", "format_size"]

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


_FORMS = "a size like '4GiB', '256KiB', '64MB' or a byte count"


def parse_size(value: str | int) -> int:
    """Parse ``"4GiB"``, ``"256 KiB"``, ``"1.5MB"`` or a plain integer into bytes.

    Binary units (KiB, MiB, GiB, TiB) are powers of 1024, decimal units (KB, MB, ...)
    powers of 1000; a bare number is bytes. Arithmetic is exact (no floats). Raises
    ``ValueError`` naming the accepted forms.
    """
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"expected {_FORMS}, got {value!r} ({type(value).__name__})")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"expected {_FORMS}, non-negative; got {value}")
        return value
    m = _SIZE_RE.match(value)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"expected {_FORMS}, got {value!r}")
    result = Fraction(m.group(1)) * _UNITS[m.group(2).lower()]
    if result.denominator != 1:
        raise ValueError(f"expected {_FORMS} that is a whole number of bytes, got {value!r}")
    return int(result)


def format_size(n: int) -> str:
    """Format a byte count with the largest binary unit that divides it evenly-ish."""
    for unit, factor in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= factor and n % factor == 0:
            return f"{n // factor}{unit}"
    for unit, factor in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= factor:
            return f"{n / factor:.1f}{unit}"
    return f"{n}B"
