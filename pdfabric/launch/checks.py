"""Checks once a launch is up, and the endpoint table.

- layout fingerprints: every engine's connector reports the same fingerprint (apart from
  its TP rank);
- every prefill -> decode link moves a real prompt's KV (about 3 MiB for the tiny model)
  from one engine to the other, checked on both engines' connectors; the push's GB/s is
  printed. A link that fails stops the launch.
"""

from __future__ import annotations

import os

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from pdfabric.config.models import Topology
from pdfabric.connector.control import query_status

__all__ = ["post_start_checks", "endpoints_table", "wait_for_instances", "proxy_key"]


def _status(inst: Any, key: bytes) -> Any:
    return query_status(f"{inst.host}:{inst.control_port}", key)


def post_start_checks(topo: Topology, key: bytes, console: Console, here: set[str] | None = None,
                      probe_tokens: int = 1500) -> None:
    """``here``: the processes this launch started (None: all); only their engines are
    checked, and only links with both ends among them are probed."""
    mine = [i for i in topo.instances if here is None or i.name in here]
    with_ctl = [i for i in mine if i.control_port is not None]
    prints = {i.name: {k: v for k, v in _status(i, key).fingerprint.items() if k != "tp_rank"} for i in with_ctl}
    if len({tuple(sorted(p.items())) for p in prints.values()}) > 1:
        raise RuntimeError(f"layout fingerprints differ between engines: {prints}")
    from pdfabric.testing.fabric import make_prompt
    from pdfabric.testing.pairing import pair_completion

    limit = (topo.model.max_model_len or 4096) - 8
    # a new prompt every launch: one the shared cache (or an engine's prefix cache) already
    # holds from an earlier run would be served without a transfer
    prompt = make_prompt(min(probe_tokens, limit), seed=int.from_bytes(os.urandom(4), "little"), vocab=1000)
    elsewhere = [i.name for i in topo.instances if i not in mine]
    if elsewhere:
        console.print(f"not checked here (another launch starts them): {escape(', '.join(elsewhere))}", highlight=False)
    for p in (i for i in mine if i.can_prefill and i.control_port is not None):
        for d in (i for i in mine if i.can_decode and i is not p):
            before = _status(d, key).counters.get("recomputes", 0) if d.control_port else 0
            r = pair_completion(f"http://{p.host}:{p.port}", f"http://{d.host}:{d.port}", f"{p.host}:{p.control_port}",
                                {"model": topo.model.display_name, "prompt": prompt, "max_tokens": 1}, timeout=120)
            pushed = next((x for x in _status(p, key).pushed if x[0] == r.transfer_id), None)
            failed = d.control_port is not None and _status(d, key).counters.get("recomputes", 0) != before
            if pushed is None or failed:
                raise RuntimeError(f"link {p.name} -> {d.name}: the probe transfer did not land (see the engine logs)")
            _, nbytes, secs = pushed
            kind = topo.transport_for(p.name, d.name).kind
            console.print(f"link {escape(p.name)} -> {escape(d.name)} ({kind}): {nbytes / 2**20:.1f} MiB pushed in "
                          f"{secs * 1000:.1f} ms = {nbytes / max(secs, 1e-9) / 1e9:.2f} GB/s", highlight=False)


def proxy_key(topo: Topology) -> str | None:
    """An API key the proxy takes (the first of ``proxy.api_keys``), None when it needs none."""
    if topo.proxy.api_keys is None:
        return None
    keys = [k.strip() for k in topo.resolve_secret(topo.proxy.api_keys, path="proxy.api_keys").split(",")]
    return next((k for k in keys if k), None)


def wait_for_instances(topo: Topology, timeout: float, console: Console) -> None:
    """Until the proxy reports every instance healthy (``/admin/instances``); RuntimeError
    naming those that are not after ``timeout`` seconds, or at once when the proxy refuses."""
    import json
    import time
    import urllib.error
    import urllib.request

    key = proxy_key(topo)
    req = urllib.request.Request(f"http://{topo.proxy.host}:{topo.proxy.port}/admin/instances",
                                 headers={"authorization": f"Bearer {key}"} if key else {})
    deadline, down = time.monotonic() + timeout, ["?"]
    console.print("waiting for the proxy to see every engine healthy", highlight=False)
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                down = [i["name"] for i in json.loads(r.read())["instances"] if not i["healthy"]]
        except urllib.error.HTTPError as e:
            e.close()
            if e.code in (401, 403):
                raise RuntimeError(f"the proxy refused the instance list: HTTP {e.code}") from None
            down = [f"(proxy: HTTP {e.code})"]
        except (OSError, ValueError, KeyError) as e:
            down = [f"(proxy: {e})"]
        if not down:
            return
        time.sleep(1.0)
    raise RuntimeError(f"not healthy at the proxy after {timeout:g}s: {', '.join(down)}")


def endpoints_table(topo: Topology, log_dir: Path, here: set[str] | None = None) -> Table:
    """The endpoints of the processes this launch started (``here``; None: all)."""
    t = Table(title=f"{escape(topo.name)}: endpoints")
    for col in ("name", "role", "OpenAI endpoint", "control", "log"):
        t.add_column(col)
    px = topo.proxy
    if here is None or "proxy" in here:
        t.add_row("proxy", "router", escape(f"http://{px.host}:{px.port}/v1"), "-", escape(str(log_dir / "proxy.log")))
    for i in (i for i in topo.instances if here is None or i.name in here):
        ctl = f"{i.host}:{i.control_port}" if i.control_port else "-"
        t.add_row(*(escape(x) for x in (i.name, i.role, f"http://{i.host}:{i.port}/v1", ctl, str(log_dir / f"{i.name}.log"))))
    return t
