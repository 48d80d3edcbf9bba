"""``pdfabric status``: what a running deployment is doing, from its proxy.

Asks the proxy (``/admin/instances``, ``/metrics``) for its instances, their health and
in-flight load, and - with ``--topology FILE`` whose ``secret`` is set - each engine's
connector for its transfers (received bytes, recent transfer GB/s, recomputes, held
blocks; every connector counter is in ``--json``). Without a proxy URL or ``--topology``,
a launch running with ``--log-dir DIR`` (default ``pdfabric-logs``) is found from its
``launch.json``: its topology, its proxy and, for engines it gave a per-launch secret, that
secret. Exit 0, 1 when the proxy cannot be reached, 2 when the topology file is unusable.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

__all__ = ["register", "run"]


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("status", help="instances, health, load and transfers of a running deployment",
                              description="Show what a running pdfabric deployment is doing.")
    p.add_argument("proxy", nargs="?", default=None,
                   help="the proxy's base URL (default: the running launch's, else http://127.0.0.1:8000)")
    p.add_argument("--topology", metavar="FILE", help="also ask each engine's connector (needs the topology's secret)")
    p.add_argument("--log-dir", type=Path, default=Path("pdfabric-logs"),
                   help="where a running `pdfabric launch` keeps its logs (default: pdfabric-logs): without "
                        "--topology, its topology, proxy and per-launch secret are used")
    p.add_argument("--api-key", help="the proxy's API key, if it has one")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.set_defaults(func=run)


def _get(url: str, key: str | None) -> bytes:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    with urllib.request.urlopen(req, timeout=5) as r:
        return r.read()


def _launch_record(log_dir: Path) -> dict[str, Any]:
    """A running launch's ``launch.json`` (``pdfabric.commands.launch``), or {} (none, or
    one left by a launch that was killed: its process is gone)."""
    from pdfabric.launch.record import live_record

    return live_record(log_dir) or {}


def _connectors(topo: Any, topology: str, launch_secret: str | None = None) -> tuple[dict[str, dict[str, Any]], str | None]:
    """(each engine's connector status or error, a note when a missing secret is the likely cause)."""
    from pdfabric.connector.control import query_status
    from pdfabric.errors import ConfigError

    try:
        secret = topo.shared_secret() or launch_secret
    except ConfigError as e:  # a running launch's topology whose secret this shell cannot read
        return {}, f"connectors not asked: {e}"
    key = (secret or "").encode()  # engines started without any secret answer an empty key
    out: dict[str, dict[str, Any]] = {}
    for i in topo.instances:
        if i.control_port is None:
            continue
        try:
            st = query_status(f"{i.host}:{i.control_port}", key, timeout_s=2.0)
        except Exception as e:
            out[i.name] = {"error": str(e)}
            continue
        moved = [(n, s) for _, n, s in (st.recent or st.pushed) if s > 0]
        gbps = sum(n for n, _ in moved) / max(sum(s for _, s in moved), 1e-9) / 1e9 if moved else None
        out[i.name] = {"counters": st.counters, "open_transfers": len(st.open_transfers), "recent_gbps": gbps}
    if secret is None and out and all("error" in c for c in out.values()):
        return out, (f"no connector answered, and {topology} names no secret: a launch of it gives its engines a "
                     "per-launch secret that only they know; set `secret:` in the topology to see transfers")
    return out, None


def run(args: argparse.Namespace) -> int:
    topo, launch_secret = None, None
    record = _launch_record(args.log_dir) if args.topology is None and args.proxy is None else {}
    topology = args.topology or record.get("topology")
    if record.get("secret_file"):
        try:
            launch_secret = Path(record["secret_file"]).read_text().strip()
        except OSError:  # the launch ended meanwhile
            launch_secret = None
    if topology:  # bad input first: exit 2 whether or not the proxy is up
        from pdfabric.config import load_topology
        from pdfabric.errors import ConfigError

        try:  # a launch's topology: its secret may live in the launch's environment, not ours
            from pdfabric.config.builtin import topology_path

            topo = load_topology(topology_path(topology)[0], check_secrets=args.topology is not None)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    base = (args.proxy or record.get("proxy") or "http://127.0.0.1:8000").rstrip("/")
    if "://" not in base:
        base = "http://" + base  # host:port, as the other commands take it
    try:
        instances = json.loads(_get(base + "/admin/instances", args.api_key))["instances"]
        metrics = _get(base + "/metrics", args.api_key).decode()
    except (urllib.error.URLError, OSError, ValueError, KeyError) as e:
        why = e.reason if isinstance(e, urllib.error.URLError) and not isinstance(e, urllib.error.HTTPError) else e
        hint = ""
        if isinstance(e, urllib.error.HTTPError) and e.code == 401:
            hint = ("; the proxy refused the key given with --api-key" if args.api_key
                    else "; the proxy has API keys: give one with --api-key")
        elif args.proxy is None and args.topology is None and not record:
            hint = (f"; no launch is running with the log directory {args.log_dir} (its launch.json): give the "
                    "proxy's URL, or --log-dir of the launch")
        print(f"error: cannot read the proxy at {base}: {why}{hint}", file=sys.stderr)
        return 1
    conn: dict[str, dict[str, Any]] = {}
    note = None
    if topo is not None:
        conn, note = _connectors(topo, topology, launch_secret)
    if args.json:
        doc: dict[str, Any] = {"instances": instances, "connectors": conn, "metrics": metrics}
        if note:
            doc["connectors_note"] = note
        print(json.dumps(doc, indent=2))
        return 0
    _print(instances, metrics, conn, note)
    return 0


def _print(instances: list[dict[str, Any]], metrics: str, conn: dict[str, dict[str, Any]], note: str | None) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    t = Table(title="pdfabric status")
    for col in ("instance", "role", "url", "health", "in flight", "served", "received", "recent GB/s", "recomputes", "held"):
        t.add_column(col)
    for i in instances:
        c = conn.get(i["name"], {})
        k = c.get("counters", {})
        health = "draining" if i["draining"] else ("up" if i["healthy"] else "down (below)")
        gbps = c.get("recent_gbps")
        t.add_row(escape(i["name"]), escape(i["role"]), escape(i["url"]), escape(health), str(i["in_flight"]), str(i["served"]),
                  f"{k.get('received_bytes', 0) / 2**20:.1f} MiB" if k else "-",
                  "-" if gbps is None else f"{gbps:.2f}",
                  str(k.get("recomputes", 0)) if k and i["role"] != "prefill" else "-", str(k.get("held_requests", "-")))
    console = Console()
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console.width = 160  # piped: do not squeeze the table to 80 columns
    console.print(t)
    for i in instances:
        if not i["healthy"] and not i["draining"]:
            why = i["last_error"] or "its health check has not answered yet"
            console.print(f"{i['name']} is down: {why}", highlight=False, markup=False, soft_wrap=True)
    for name, c in conn.items():
        if "error" in c:
            console.print(f"connector of {name}: {c['error']}", highlight=False, markup=False, soft_wrap=True)
    if note:
        console.print(note, highlight=False, markup=False, soft_wrap=True)
    lines = [ln for ln in metrics.splitlines() if ln.startswith(("pdfabric_proxy_requests_total", "pdfabric_proxy_decode_alone",
                                                                   "pdfabric_proxy_prefill_failures", "pdfabric_proxy_errors"))]
    console.print("\n".join(lines), highlight=False, markup=False)
