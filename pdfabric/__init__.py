"""pdfabric: prefill/decode disaggregation transfer fabric for LLM serving."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
