"""Routing proxy (OpenAI-compatible): ``pdfabric proxy``; see ``pdfabric.proxy.server``."""

from __future__ import annotations

__all__: list[str] = []
