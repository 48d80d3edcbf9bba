"""Routing proxy (OpenAI-compatible). Not implemented yet; see the proxy issue."""

from __future__ import annotations

__all__: list[str] = []
