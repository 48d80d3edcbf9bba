"""``pdfabric config``: check and show topology files.

``pdfabric config check FILE`` validates FILE (secret references included) and prints a
summary of the resolved topology; ``pdfabric config show FILE [--json]`` prints the fully
resolved model, defaults filled in; ``pdfabric config list`` names the built-in topologies,
which both take in place of a FILE. Both exit 0 on success and 2 on a configuration
error, which is printed as ``error: <message>`` lines on stderr (never a traceback).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console

    from pdfabric.config import CacheConfig, CacheTier, SecretRef, Topology, TransportConfig
    from pdfabric.errors import ConfigError

__all__ = ["register", "run_check", "run_show", "run_list"]

EXIT_OK = 0
EXIT_CONFIG_ERROR = 2


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``config check`` and ``config show`` to the ``pdfabric`` command line."""
    parser = subparsers.add_parser(
        "config",
        help="check and show topology files",
        description="Validate a YAML topology file and print what it resolves to.",
    )
    sub = parser.add_subparsers(dest="config_command", metavar="SUBCOMMAND", required=True)
    check = sub.add_parser(
        "check",
        help="validate a topology file and print a summary",
        description="Validate FILE, check that its secret references resolve, print a summary.",
    )
    check.add_argument("file", metavar="FILE", help="topology YAML file, or a built-in topology's name")
    check.add_argument(
        "--skip-secrets",
        action="store_true",
        help="do not check that secret references (env vars, files) resolve here",
    )
    check.set_defaults(func=run_check)
    show = sub.add_parser(
        "show",
        help="print the fully resolved topology (defaults filled in)",
        description="Print FILE's resolved topology as YAML, or JSON with --json.",
    )
    show.add_argument("file", metavar="FILE", help="topology YAML file, or a built-in topology's name")
    show.add_argument("--json", action="store_true", help="print JSON instead of YAML")
    show.set_defaults(func=run_show)
    listing = sub.add_parser(
        "list",
        help="the built-in topologies (usable by name wherever a FILE is taken)",
        description="List the topologies shipped with pdfabric, with the first line of each.",
    )
    listing.set_defaults(func=run_list)


def run_check(args: argparse.Namespace) -> int:
    """``config check``: exit 0 and print a summary, or exit 2 with ``error:`` lines."""
    from pdfabric.config import load_topology
    from pdfabric.errors import ConfigError

    from pdfabric.config.builtin import topology_path

    path = None
    try:
        path = topology_path(args.file)[0]
        topology = load_topology(path, check_secrets=not args.skip_secrets)
    except ConfigError as exc:
        code = _fail(exc)
        if path is not None and not args.skip_secrets:
            try:
                load_topology(path, check_secrets=False)
            except ConfigError:
                return code
            print("note: everything else is valid; only secret references do not resolve here "
                  "(set them, or check the rest with --skip-secrets)", file=sys.stderr)
        return code
    _print_summary(topology, secrets_checked=not args.skip_secrets)
    return EXIT_OK


def run_show(args: argparse.Namespace) -> int:
    """``config show``: print the resolved topology as YAML (or JSON with ``--json``)."""
    from pdfabric.config import load_topology
    from pdfabric.errors import ConfigError

    from pdfabric.config.builtin import topology_path

    try:
        topology = load_topology(topology_path(args.file)[0])
    except ConfigError as exc:
        return _fail(exc)
    doc = topology.model_dump(mode="json")
    # defaults that depend on other fields, as the programs use them
    doc["model"]["served_name"] = topology.model.display_name
    if topology.cache is not None and topology.cache.server is not None:
        doc["cache"]["server"]["http_port"] = topology.cache.server.http
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        import yaml

        print(f"# {args.file}, resolved (defaults filled in, sizes in bytes)")
        print(yaml.safe_dump(doc, sort_keys=False), end="")
    return EXIT_OK


def run_list(args: argparse.Namespace) -> int:
    """``config list``: each built-in topology's name and what its first comment line says."""
    from pdfabric.config.builtin import DEFAULT, builtin_dir, builtin_names
    from pdfabric.errors import ConfigError

    try:
        names = builtin_names()
    except ConfigError as exc:
        return _fail(exc)
    for name in names:
        first = (builtin_dir() / f"{name}.yaml").read_text(encoding="utf-8").splitlines()[:1]
        about = first[0].lstrip("# ").removeprefix(f"{name} - ").strip() if first else ""
        print(f"{name:24s} {about}{' (the default of pdfabric launch)' if name == DEFAULT else ''}")
    return EXIT_OK


def _fail(exc: ConfigError) -> int:
    for line in str(exc).splitlines():
        print(f"error: {line}", file=sys.stderr)
    return EXIT_CONFIG_ERROR


# -------------------------------------------------------------------------- summary


def _console() -> Console:
    from rich.console import Console

    console = Console(highlight=False, soft_wrap=False)
    if not console.is_terminal:
        console.width = 120
    return console


def describe_transport(transport: TransportConfig) -> str:
    """``tcp (streams=2, connect_timeout_s=5.0, transfer_timeout_s=30.0)``."""
    params = [f"{k}={v}" for k, v in transport.model_dump().items() if k != "kind"]
    return f"{transport.kind} ({', '.join(params)})" if params else transport.kind


def _print_summary(topology: Topology, *, secrets_checked: bool) -> None:
    from rich.markup import escape

    console = _console()
    model = topology.model
    console.print(f"[bold]topology[/] {escape(topology.name)} (version {topology.version})"
                  f" from {escape(topology.source or '-')}")
    console.print(
        f"[bold]model[/] {escape(model.builtin or model.path or '')}: served as "
        f"{escape(model.display_name)}, dtype {model.dtype}, block_size {model.block_size}, "
        f"max_model_len {model.max_model_len or 'model default'}"
    )
    if topology.secret is None:
        secret = "none (per-launch random secret)"
    else:
        state = " (resolves)" if secrets_checked else " (not checked)"
        secret = topology.secret.describe() + state
    console.print(f"[bold]secret[/] {escape(secret)}")
    console.print(_instances_table(topology))
    console.print(_links_table(topology))
    if topology.cache is not None:
        console.print(_cache_table(topology.cache))
    else:
        console.print("[bold]cache[/] none")
    console.print(_proxy_line(topology), soft_wrap=True)


def _instances_table(topology: Topology) -> Any:
    from rich.table import Table

    table = Table(title="instances", title_justify="left")
    for column in ("name", "role", "host", "port", "control", "devices", "TP", "engine args / env"):
        table.add_column(column, no_wrap=column != "engine args / env")
    for inst in topology.instances:
        extra = [f"--{k}={v}" for k, v in inst.engine_args.items()]
        extra += [f"{k}={v}" for k, v in inst.env.items()]
        table.add_row(
            inst.name,
            inst.role,
            inst.host,
            str(inst.port),
            str(inst.control_port or "-"),
            ",".join(map(str, inst.devices)) or "-",
            str(inst.tensor_parallel_size),
            " ".join(extra) or "-",
        )
    return table


def _links_table(topology: Topology) -> Any:
    from rich.table import Table

    table = Table(title="P->D links", title_justify="left")
    for column in ("prefill", "decode", "transport", "from"):
        table.add_column(column)
    overridden = {(link.prefill, link.decode) for link in topology.links}
    for p, d, transport in topology.pairs():
        source = "links" if (p.name, d.name) in overridden else "default"
        table.add_row(p.name, d.name, describe_transport(transport), source)
    if not topology.pairs():
        table.add_row("-", "-", describe_transport(topology.transport), "default (no P->D pair)")
    return table


_TIER_LEVEL = {"memory": "L1", "disk": "L2", "redis": "L3", "s3": "L3"}


def _cache_table(cache: CacheConfig) -> Any:
    from rich.table import Table

    where = cache.server and f"server {cache.server.host}:{cache.server.port}"
    server = where or "in-engine"
    title = f"cache ({cache.chunk_tokens}-token chunks, {server})"
    table = Table(title=title, title_justify="left")
    for column in ("tier", "kind", "where", "size / options"):
        table.add_column(column)
    for tier in cache.tiers:
        table.add_row(_TIER_LEVEL[tier.kind], tier.kind, *_tier_details(tier))
    return table


def _tier_details(tier: CacheTier) -> tuple[str, str]:
    from pdfabric.units import format_size

    def ref(secret: SecretRef | None, none: str) -> str:
        return secret.describe() if secret is not None else none

    if tier.kind == "memory":
        return "RAM", format_size(tier.size)
    if tier.kind == "disk":
        return tier.path, format_size(tier.size)
    if tier.kind == "redis":
        return tier.url, f"password {ref(tier.password, 'none')}, ttl {tier.ttl_s or '-'}s"
    where = f"s3://{tier.bucket}/{tier.prefix}" + (f" at {tier.endpoint}" if tier.endpoint else "")
    return where, f"region {tier.region or '-'}, keys {ref(tier.access_key, 'default chain')}"


def _proxy_line(topology: Topology) -> str:
    from rich.markup import escape

    from pdfabric.units import format_size

    proxy = topology.proxy
    keys = proxy.api_keys.describe() if proxy.api_keys else "none (open)"
    return escape(
        f"proxy {proxy.host}:{proxy.port}: policy {proxy.policy}, pairing {proxy.pairing}, "
        f"disaggregate from {proxy.disaggregate_min_tokens} tokens, leg timeout "
        f"{proxy.leg_timeout_s:g}s, max body {format_size(proxy.max_body)}, api keys {keys}"
    )
