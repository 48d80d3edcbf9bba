"""``pdfabric proxy``: run the routing proxy.

Instances and policy come from a topology file (``--topology FILE``) or from flags::

    pdfabric proxy --prefill http://127.0.0.1:8100@127.0.0.1:8101 --decode http://127.0.0.1:8200

(``URL@CONTROL``: an engine's OpenAI URL and its connector's control endpoint.) Flags given
with ``--topology`` override the file's ``proxy`` section. Exits 2 on bad input.

``--cache HOST:PORT`` (the cache server's engine port; ``--cache-http PORT`` when its HTTP
port is not PORT+1), or ``proxy.cache_lookup: true`` in a topology with ``cache.server``:
prompts the shared KV cache holds but for a short rest go to a decode engine alone.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import Any

__all__ = ["register", "settings_and_registry"]


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("proxy", help="run the OpenAI-compatible routing proxy",
                              description="Pair each request with a prefill and a decode engine.")
    p.add_argument("--topology", metavar="FILE", help="topology YAML: instances and proxy settings")
    p.add_argument("--prefill", action="append", default=[], metavar="URL@CONTROL", help="a prefill engine (repeatable)")
    p.add_argument("--decode", action="append", default=[], metavar="URL", help="a decode engine (repeatable)")
    p.add_argument("--host", help="address to listen on (default: the topology's proxy.host, else 127.0.0.1)")
    p.add_argument("--port", type=int, help="port to listen on (default: the topology's proxy.port, else 8000; 0: any free port)")
    p.add_argument("--policy", choices=["round_robin", "least_loaded", "prefix_aware"])
    p.add_argument("--pairing", choices=["concurrent", "sequential"])
    p.add_argument("--min-tokens", type=int, dest="min_tokens", help="shorter prompts go to a decode engine alone")
    p.add_argument("--api-key-env", metavar="NAME", help="environment variable holding API keys (comma separated)")
    p.add_argument("--model", help="model name for /v1/models (default: ask an engine)")
    p.add_argument("--health-interval", type=_positive, metavar="SECONDS", dest="health_interval",
                   help="seconds between health probes of every instance (default 2)")
    p.add_argument("--leg-timeout", type=_positive, metavar="SECONDS", dest="leg_timeout",
                   help="longest silence of an engine before its leg is given up (default 600)")
    p.add_argument("--state-file", metavar="FILE", dest="state_file",
                   help="keep admin changes (added, drained, removed instances) here; when it exists, "
                        "start from it instead of the topology's instances")
    p.add_argument("--cache", metavar="HOST:PORT", help="ask this cache server (its engine port) how much of "
                   "each prompt is cached; mostly cached prompts go to a decode engine alone")
    p.add_argument("--cache-http", type=int, metavar="PORT", dest="cache_http",
                   help="the cache server's HTTP port, for its keying (default: its port + 1)")
    p.add_argument("--cache-local-tokens", type=int, metavar="N", dest="cache_local_tokens",
                   help="a prompt cached but for at most N tokens skips the prefill leg (default 256)")
    p.set_defaults(func=run)


def settings_and_registry(args: argparse.Namespace) -> tuple[Any, Any]:
    from pdfabric.config import load_topology
    from pdfabric.errors import ConfigError
    from pdfabric.proxy.instances import Instance, Registry
    from pdfabric.proxy.server import ProxySettings

    base: dict[str, Any] = {}
    instances: list[Instance] = []
    if args.topology:
        from pdfabric.config.builtin import topology_path

        topo = load_topology(topology_path(args.topology)[0], check_secrets=True)
        px = topo.proxy
        keys = topo.resolve_secret(px.api_keys, path="proxy.api_keys") if px.api_keys else ""
        base = dict(host=px.host, port=px.port, policy=px.policy, pairing=px.pairing,
                    disaggregate_min_tokens=px.disaggregate_min_tokens, leg_timeout_s=px.leg_timeout_s,
                    max_body=int(px.max_body), api_keys=_keys(keys), model=topo.model.display_name,
                    health_interval_s=px.health_interval_s, prefill_attempts=px.prefill_attempts,
                    decode_attempts=px.decode_attempts, cache_local_tokens=px.cache_local_tokens,
                    cache_timeout_s=px.cache_timeout_s, **_topology_cache(topo))
        for i in topo.instances:
            control = f"{i.host}:{i.control_port}" if i.control_port is not None and i.can_prefill else None
            instances.append(Instance(i.name, i.role, f"http://{i.host}:{i.port}", control))
    for n, spec in enumerate(args.prefill):
        url, sep, control = spec.rpartition("@")
        if not sep or not url.startswith("http"):
            raise ConfigError(f"--prefill expects URL@CONTROL (http://host:port@host:port), got {spec!r}")
        instances.append(Instance(f"prefill-{n}", "prefill", url.rstrip("/"), control))
    for n, url in enumerate(args.decode):
        if not url.startswith("http"):
            raise ConfigError(f"--decode expects an http://host:port URL, got {url!r}")
        instances.append(Instance(f"decode-{n}", "decode", url.rstrip("/")))
    if not any(i.can_decode for i in instances):
        raise ConfigError("no decode instance: give --decode URL or a --topology with a decode/both instance")
    if args.port is not None and not 0 <= args.port < 65536:
        raise ConfigError(f"expected a port 1-65535 (0: any free port), got {args.port}", path="--port")
    if args.min_tokens is not None and args.min_tokens < 0:
        raise ConfigError(f"expected a token count >= 0, got {args.min_tokens}", path="--min-tokens")
    flags = {"host": args.host, "port": args.port, "policy": args.policy, "pairing": args.pairing,
             "disaggregate_min_tokens": args.min_tokens, "model": args.model,
             "health_interval_s": args.health_interval, "leg_timeout_s": args.leg_timeout}
    base.update({k: v for k, v in flags.items() if v is not None})
    base.update(_cache_flags(args))
    if args.api_key_env:
        base["api_keys"] = _keys(os.environ.get(args.api_key_env, ""))
        if not base["api_keys"]:
            raise ConfigError(f"--api-key-env {args.api_key_env}: the variable is unset or empty")
    try:
        registry = Registry(instances)
    except ValueError as e:  # a flag's prefill-N / decode-N also named in the topology
        raise ConfigError(f"{e} in {args.topology}: --prefill/--decode instances are named prefill-N/decode-N "
                          "and must not take a name the topology uses") from None
    if args.state_file:
        from pdfabric.proxy.instances import basis_of

        basis = basis_of(instances)
        base.update(state_file=str(Path(args.state_file).resolve()), state_basis=basis)
        registry = _saved_registry(Path(args.state_file), basis) or registry
    return ProxySettings(**base), registry


def _saved_registry(path: Path, basis: str) -> Any:
    """The registry an earlier run of this proxy left in its state file; None (and why, on
    stderr) when there is none it can use: the proxy then starts from its topology and flags
    rather than not at all (its launcher would restart it into the same file)."""
    from pdfabric.proxy.instances import Registry, load_state

    try:
        saved = load_state(path)
        if saved is None:
            return None
        if saved[0] != basis:
            print(f"pdfabric proxy: --state-file {path} was saved by a proxy started with other instances "
                  "(the topology or flags changed); starting from the instances given", file=sys.stderr)
            return None
        registry = Registry(saved[1])
    except (ValueError, OSError) as e:
        why = f"cannot read it: {e.strerror}" if isinstance(e, OSError) else str(e)
        print(f"pdfabric proxy: error: --state-file {path}: {why}; starting from the instances given",
              file=sys.stderr)
        return None
    print(f"pdfabric proxy: instances as an earlier run's admin changes left them, from {path}", file=sys.stderr)
    return registry


def _topology_cache(topo: Any) -> dict[str, Any]:
    """The cache server's addresses when ``proxy.cache_lookup`` is on (the topology's checks
    refused it without ``cache.server``)."""
    if not topo.proxy.cache_lookup:
        return {}
    srv = topo.cache.server
    host = "127.0.0.1" if srv.host in ("0.0.0.0", "::") else srv.host  # a wildcard bind: dial loopback
    host = f"[{host}]" if ":" in host else host
    return {"cache_address": f"{host}:{srv.port}", "cache_http_port": srv.http}


def _cache_flags(args: argparse.Namespace) -> dict[str, Any]:
    from pdfabric.errors import ConfigError

    out: dict[str, Any] = {}
    if args.cache is not None:
        host, sep, port = args.cache.rpartition(":")
        if not sep or not host or "/" in args.cache or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"expected the cache server's HOST:PORT (its engine port), got {args.cache!r}",
                              path="--cache")
        out.update(cache_address=args.cache, cache_http_port=None)
    if args.cache_http is not None:
        if args.cache is None:
            raise ConfigError("needs --cache HOST:PORT (the cache server's engine port)", path="--cache-http")
        if not 0 < args.cache_http < 65536:
            raise ConfigError(f"expected a port, got {args.cache_http}", path="--cache-http")
        out["cache_http_port"] = args.cache_http
    if args.cache_local_tokens is not None:
        if args.cache_local_tokens < 0:
            raise ConfigError(f"expected a token count >= 0, got {args.cache_local_tokens}",
                              path="--cache-local-tokens")
        out["cache_local_tokens"] = args.cache_local_tokens
    return out


def _keys(text: str) -> tuple[str, ...]:
    return tuple(k.strip() for k in text.split(",") if k.strip())


def run(args: argparse.Namespace) -> int:
    from pdfabric.errors import ConfigError

    try:
        settings, registry = settings_and_registry(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(_serve(settings, registry))


async def _serve(settings: Any, registry: Any) -> int:
    from pdfabric.proxy.server import Proxy

    proxy = Proxy(settings, registry)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        port = await proxy.start()
    except OSError as e:
        await proxy.stop()  # its engine client session was opened before the listen failed
        print(f"error: cannot listen on {settings.host}:{settings.port}: {e}", file=sys.stderr)
        return 2
    names = ", ".join(f"{i.name} ({i.role})" for i in registry.all())
    print(f"pdfabric proxy on http://{settings.host}:{port} - {settings.policy}, {settings.pairing}; {names}", flush=True)
    await stop.wait()
    await proxy.stop()
    return 0
