"""A minimal pairing client: one request through a prefill and a decode engine.

The full routing proxy lives in ``pdfabric.proxy``; this is what tests and the TTFT
benchmark use to drive a P/D pair directly, in either order:

- ``concurrent``: both legs at once with a shared transfer id; the decode engine's grant
  and the prefill engine's compute race, and either may come first.
- ``sequential``: the prefill leg first; its response's ``kv_transfer_params`` go to
  the decode leg unchanged (what vLLM's own toy proxy does for NixlConnector).
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from pdfabric.testing.engines import EngineError, http_json

__all__ = ["PairResult", "pair_completion"]


@dataclass
class PairResult:
    decode: dict[str, Any]
    prefill: dict[str, Any] | None
    transfer_id: str
    prefill_s: float
    total_s: float

    @property
    def text(self) -> str:
        return str(self.decode["choices"][0]["text"])

    @property
    def token_ids(self) -> list[int] | None:
        return self.decode["choices"][0].get("token_ids")


def pair_completion(
    prefill_url: str,
    decode_url: str,
    producer: str,
    body: dict[str, Any],
    *,
    mode: Literal["concurrent", "sequential"] = "concurrent",
    transfer_id: str | None = None,
    timeout: float = 300.0,
) -> PairResult:
    """Run ``body`` (an OpenAI completion request) disaggregated; ``producer`` is the
    prefill engine's control endpoint ``host:port``."""
    tid = transfer_id or f"t-{uuid.uuid4().hex}"
    p_body = {"model": "tiny-llama", **body, "max_tokens": 1, "stream": False,
              "kv_transfer_params": {"pdfabric": "produce", "transfer_id": tid}}
    d_body = {"model": "tiny-llama", **body}
    t0 = time.perf_counter()
    if mode == "sequential":
        p = http_json(prefill_url + "/v1/completions", p_body, timeout)
        prefill_s = time.perf_counter() - t0
        params = p.get("kv_transfer_params")
        if not params:
            raise EngineError(f"prefill response carries no kv_transfer_params: {p}")
        d = http_json(decode_url + "/v1/completions", {**d_body, "kv_transfer_params": params}, timeout)
        return PairResult(d, p, tid, prefill_s, time.perf_counter() - t0)
    d_body["kv_transfer_params"] = {"pdfabric": "consume", "transfer_id": tid, "producer": producer}
    box: dict[str, Any] = {}

    def prefill() -> None:
        try:
            box["p"] = http_json(prefill_url + "/v1/completions", p_body, timeout)
        except Exception as e:  # reported below; the decode leg recomputes on its own
            box["err"] = e
        box["t"] = time.perf_counter() - t0

    th = threading.Thread(target=prefill, daemon=True)
    th.start()
    d = http_json(decode_url + "/v1/completions", d_body, timeout)
    th.join(timeout)
    return PairResult(d, box.get("p"), tid, float(box.get("t", 0.0)), time.perf_counter() - t0)
