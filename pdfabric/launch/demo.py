"""The launch demo client: a long shared document, different questions, through the proxy.

For each question it streams the answer and prints the TTFT and its split, read from the
engines' connector status for that request's transfer id (``x-pdfabric-transfer-id``):

- ``kv wait``: decode engine, from its grant to the last KV byte landing (covers the
  prefill compute that ran concurrently, and the push);
- ``push``: prefill engine, the time its layer writes spent on the wire (write to
  acknowledgement, summed over layers), and the GB/s of that push;
- ``first token``: TTFT minus the KV wait (scheduling and the decode step).
"""

from __future__ import annotations

import http.client
import json
import logging
import random
import time
from dataclasses import dataclass
from typing import Any

import zmq
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from pdfabric.config.models import Topology
from pdfabric.connector.control import query_status
from pdfabric.errors import FabricError

log = logging.getLogger("pdfabric.launch")

__all__ = ["run_demo", "DemoRow", "document"]

QUESTIONS = [
    "What does the prefill engine send to the decode engine?",
    "Which transport is used for this deployment?",
    "How are the blocks reserved on the decode side?",
    "What happens when a transfer times out?",
    "Who decides which engines serve a request?",
]


def document(words: int = 900, seed: int = 7) -> str:
    rng = random.Random(seed)
    vocab = ["cache", "block", "layer", "prefill", "decode", "token", "engine", "transfer", "grant", "push",
             "memory", "stream", "proxy", "request", "prompt", "answer", "model", "lease", "host", "socket"]
    sentences = []
    while sum(len(s.split()) for s in sentences) < words:
        sentences.append(" ".join(rng.choice(vocab) for _ in range(rng.randint(6, 14))).capitalize() + ".")
    return "Document:\n" + " ".join(sentences)


@dataclass
class DemoRow:
    question: str
    answer: str
    ttft_s: float
    total_s: float
    transfer_id: str
    kv_wait_s: float | None = None
    push_s: float | None = None
    push_bytes: int | None = None
    cached_tokens: int | None = None  # prompt tokens the shared cache served (proxy cache lookup on)


def _stream(host: str, port: int, body: dict[str, Any], api_key: str | None) -> tuple[str, float, float, dict[str, str]]:
    conn = http.client.HTTPConnection(host, port, timeout=300)
    headers = {"content-type": "application/json"}
    if api_key:
        headers["authorization"] = f"Bearer {api_key}"
    t0 = time.perf_counter()
    conn.request("POST", "/v1/completions", json.dumps(body), headers)
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"proxy answered HTTP {resp.status}: {resp.read()[:300].decode(errors='replace')}")
    text, ttft = [], 0.0
    for raw in resp:
        line = raw.strip()
        if not line.startswith(b"data:") or line == b"data: [DONE]":
            continue
        if not ttft:
            ttft = time.perf_counter() - t0
        text.append(json.loads(line[5:])["choices"][0].get("text", ""))
    total = time.perf_counter() - t0
    hdrs = {k.lower(): v for k, v in resp.getheaders()}
    conn.close()
    return "".join(text), ttft, total, hdrs


def _lookup(topo: Topology, name: str | None, secret: bytes, tid: str, field_name: str) -> tuple[int, float] | None:
    inst = next((i for i in topo.instances if i.name == name), None)
    if inst is None or inst.control_port is None:
        return None
    try:
        st = query_status(f"{inst.host}:{inst.control_port}", secret, timeout_s=2.0)
    except (TimeoutError, FabricError, OSError, zmq.ZMQError) as e:  # unanswered or refused: the row shows "-"
        log.warning("pdfabric demo: no status from %s: %s", inst.name, e)
        return None
    for t, nbytes, secs in getattr(st, field_name):
        if t == tid:
            return nbytes, secs
    return None


def run_demo(topo: Topology, secret: bytes, console: Console, questions: int = 5, max_tokens: int = 24) -> list[DemoRow]:
    from pdfabric.launch.checks import proxy_key

    host, port, key = topo.proxy.host, topo.proxy.port, proxy_key(topo)
    doc = document()
    rows = []
    for q in QUESTIONS[:questions]:
        body = {"model": topo.model.display_name, "prompt": f"{doc}\nQuestion: {q}\nAnswer:",
                "max_tokens": max_tokens, "temperature": 0, "stream": True}
        text, ttft, total, hdrs = _stream(host, port, body, key)
        row = DemoRow(q, text.strip(), ttft, total, hdrs.get("x-pdfabric-transfer-id", ""))
        if hdrs.get("x-pdfabric-cached-tokens", "").isdigit():
            row.cached_tokens = int(hdrs["x-pdfabric-cached-tokens"])
        time.sleep(0.2)  # let the engines' connectors record the transfer
        got = _lookup(topo, hdrs.get("x-pdfabric-decode"), secret, row.transfer_id, "recent")
        if got:
            row.kv_wait_s = got[1]
        got = _lookup(topo, hdrs.get("x-pdfabric-prefill"), secret, row.transfer_id, "pushed")
        if got:
            row.push_bytes, row.push_s = got
        rows.append(row)
    looked_up = topo.cache is not None and topo.proxy.cache_lookup
    console.print(_table(rows, looked_up))
    if looked_up:
        hits = [r.cached_tokens for r in rows if r.cached_tokens]
        missed = sum(r.cached_tokens is None for r in rows)
        console.print(f"shared cache: {len(hits)} of {len(rows)} questions found cached tokens"
                      + (f" ({sum(hits) // len(hits)} on average)" if hits else "")
                      + (f"; {missed} not looked up by the proxy (see pdfabric_proxy_cache_lookups_total "
                         f"on its /metrics)" if missed else ""), highlight=False)
    return rows


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1000:.1f}"


def _table(rows: list[DemoRow], cache: bool = False) -> Table:
    t = Table(title="pdfabric demo: one document, different questions (through the proxy)")
    cache = cache or any(r.cached_tokens is not None for r in rows)
    cols = ["question", "answer", "TTFT ms", "kv wait ms", "push ms", "push GB/s", "first token ms", "total ms"]
    for col in cols + (["cached tokens"] if cache else []):
        t.add_column(col, overflow="fold")
    for r in rows:
        gbps = "-" if not r.push_s or not r.push_bytes else f"{r.push_bytes / r.push_s / 1e9:.2f}"
        first = None if r.kv_wait_s is None else max(0.0, r.ttft_s - r.kv_wait_s)
        cells = [escape(r.question), escape(r.answer[:60]), _ms(r.ttft_s), _ms(r.kv_wait_s), _ms(r.push_s), gbps, _ms(first), _ms(r.total_s)]
        t.add_row(*cells, *([str(r.cached_tokens if r.cached_tokens is not None else "-")] if cache else []))
    notes = ["kv wait: the decode engine's wait for the prompt's KV (the prefill engine computing it, then the "
             "push). The first question computes the whole document; later ones reuse the prefill engine's prefix "
             "cache, and only the blocks the decode engine does not hold yet are pushed"]
    if cache:
        notes.append("cached tokens: leading prompt tokens the shared cache holds; a question whose rest is short "
                     "is served by the decode engine alone (no push)")
    t.caption = "\n".join(notes)
    return t
