"""``pdfabric cache-server``: the host's shared KV cache for every engine on it.

From a topology's ``cache`` section (``--topology FILE``; its ``cache.server`` gives host and
ports) or from flags::

    pdfabric cache-server --port 8300 --memory 4GiB --disk /var/cache/pdfabric --disk-size 50GiB \\
        --redis redis://127.0.0.1:6379/0

Prints one line once it listens; SIGINT/SIGTERM stop it (the disk tier stays for the next
start). Exits 2 on bad input.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path
from typing import Any

__all__ = ["register", "config_from_args"]


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("cache-server", help="run the host's shared KV cache server",
                              description="Serve the tiered KV cache (memory, disk, redis, s3) to the engines of this host.")
    p.add_argument("--topology", metavar="FILE", help="topology YAML with a cache section")
    p.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="engines' port (ZMQ); 0 picks a free one")
    p.add_argument("--http-port", type=int, dest="http_port", help="/health, /metrics, admin API (default port+1)")
    p.add_argument("--memory", metavar="SIZE", help="L1 size, e.g. 4GiB")
    p.add_argument("--disk", metavar="DIR", help="L2 directory")
    p.add_argument("--disk-size", metavar="SIZE", dest="disk_size", help="L2 size bound (default 10GiB)")
    p.add_argument("--redis", metavar="URL", help="L3 Redis/Valkey URL (no password in it)")
    p.add_argument("--redis-password-env", metavar="NAME", dest="redis_password_env",
                   help="environment variable holding the Redis password")
    p.add_argument("--chunk-tokens", type=int, dest="chunk_tokens", help="tokens per chunk (default 256)")
    p.add_argument("--lease-ttl", type=float, dest="lease_ttl", metavar="SECONDS",
                   help="pins of a client that died end after this (default 60)")
    p.add_argument("--forget-idle", type=float, dest="forget_idle", metavar="SECONDS",
                   help="a connection silent this long is forgotten; its engine says hello again (default 3600)")
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> tuple[Any, dict[str, Any], str | None]:
    """(CacheConfig, service options, base dir for relative paths); ``ConfigError`` on bad input."""
    opts: dict[str, Any] = {"host": "127.0.0.1", "port": 0, "http_port": None, "lease_ttl_s": 60.0}
    base: str | None = None
    if args.topology:
        config, base = _config_from_topology(args, opts)
    else:
        config = _config_from_flags(args)
    _apply_flags(args, opts)
    return config, opts, base


def _config_from_topology(args: argparse.Namespace, opts: dict[str, Any]) -> tuple[Any, str | None]:
    """The cache section of ``--topology`` (its server settings go into ``opts``), and its base dir."""
    from pdfabric.config import load_topology
    from pdfabric.config.builtin import builtin_names
    from pdfabric.errors import ConfigError

    if any((args.memory, args.disk, args.redis, args.disk_size, args.redis_password_env)) \
            or args.chunk_tokens is not None:
        raise ConfigError("give the tiers (and --disk-size, --chunk-tokens, --redis-password-env) either in "
                          "--topology's cache section or as flags, not both")
    if not Path(args.topology).exists() and args.topology.removesuffix(".yaml") in builtin_names():
        # its relative disk path would land inside the installed package
        raise ConfigError(f"no such file; {args.topology} is a built-in topology: run it with `pdfabric launch "
                          f"{args.topology}` (it copies it to its log directory), or write a copy with "
                          f"`pdfabric config show {args.topology} > FILE` and give that", path="--topology")
    topo = load_topology(args.topology)
    if topo.cache is None:
        raise ConfigError(f"{args.topology} has no cache section", path="cache")
    if topo.cache.server is not None:
        srv = topo.cache.server
        opts.update(host=srv.host, port=srv.port, http_port=srv.http, lease_ttl_s=srv.lease_ttl_s)
    return topo.cache, topo._base_dir


def _config_from_flags(args: argparse.Namespace) -> Any:
    """The CacheConfig that ``--memory``, ``--disk`` and ``--redis`` (and their companions) describe."""
    from pydantic import ValidationError

    from pdfabric.config.models import CacheConfig
    from pdfabric.errors import ConfigError

    if not args.memory:
        raise ConfigError("--memory SIZE is required (L1: engines read and write through it)", path="--memory")
    tiers: list[dict[str, Any]] = [{"kind": "memory", "size": args.memory}]
    if args.disk:
        tiers.append({"kind": "disk", "path": args.disk, "size": args.disk_size or "10GiB"})
    elif args.disk_size:
        raise ConfigError("needs --disk DIR", path="--disk-size")
    if args.redis:
        redis: dict[str, Any] = {"kind": "redis", "url": args.redis}
        if args.redis_password_env:
            redis["password"] = {"env": args.redis_password_env}
        tiers.append(redis)
    elif args.redis_password_env:
        raise ConfigError("needs --redis URL", path="--redis-password-env")
    data: dict[str, Any] = {"tiers": tiers}
    if args.chunk_tokens is not None:
        data["chunk_tokens"] = args.chunk_tokens
    try:
        return CacheConfig.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        msg = first["msg"].removeprefix("Value error, ")
        if " got " not in msg and "input" in first:
            msg = f"{msg}, got {first['input']!r}"
        if "password: {env: VAR}" in msg:
            msg = "the URL holds a password; give it with --redis-password-env NAME instead"
        raise ConfigError(msg, path=_flag_of(first["loc"], tiers)) from None


def _apply_flags(args: argparse.Namespace, opts: dict[str, Any]) -> None:
    """Server flags over ``opts`` (which may hold the topology's), then their ranges checked."""
    from pdfabric.errors import ConfigError

    for key, flag in (("host", args.host), ("port", args.port), ("http_port", args.http_port),
                      ("lease_ttl_s", args.lease_ttl), ("forget_idle_s", args.forget_idle)):
        if flag is not None:
            opts[key] = flag
    for key, name in (("lease_ttl_s", "--lease-ttl"), ("forget_idle_s", "--forget-idle")):
        if key in opts and not opts[key] > 0:  # not NaN either
            raise ConfigError(f"must be a positive number of seconds, got {opts[key]}", path=name)
    if opts["http_port"] is None:
        opts["http_port"] = opts["port"] + 1 if opts["port"] else 0
    for key, name in (("port", "--port"), ("http_port", "--http-port")):
        if not 0 <= opts[key] <= 65535:
            why = " (port + 1; give --http-port)" if key == "http_port" and args.http_port is None else ""
            raise ConfigError(f"expected a port 0-65535, got {opts[key]}{why}", path=name)


def _flag_of(loc: tuple[Any, ...], tiers: list[dict[str, Any]]) -> str:
    """The flag behind a validation error's location in the cache config built from flags."""
    if loc and loc[0] == "tiers" and len(loc) > 1 and isinstance(loc[1], int) and loc[1] < len(tiers):
        kind, field = tiers[loc[1]]["kind"], (loc[3] if len(loc) > 3 else "")
        return {("memory", "size"): "--memory", ("disk", "path"): "--disk", ("disk", "size"): "--disk-size",
                ("redis", "url"): "--redis", ("redis", "password"): "--redis-password-env"}.get((kind, field), f"--{kind}")
    if loc and loc[0] == "chunk_tokens":
        return "--chunk-tokens"
    return ".".join(str(x) for x in loc)


def run(args: argparse.Namespace) -> int:
    from pdfabric.errors import ConfigError

    try:
        config, opts, base = config_from_args(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import logging

    from pdfabric.cache.server import CacheService

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    svc = CacheService(config, base_dir=base, **opts)
    try:
        svc.start()
    except ConfigError as e:  # a disk tier's directory unusable or taken
        msg = str(e)
        if not args.topology and e.path:  # the tiers came from flags: name the flag
            msg = msg.replace(f"{e.path}: ", "--disk: ", 1)
        print(f"error: {msg}", file=sys.stderr)
        svc.stop()
        return 2
    except OSError as e:  # a port in use (the message names which), /dev/shm missing
        why = e.strerror if e.strerror and not e.filename else str(e)
        print(f"error: cannot start the cache server: {why}", file=sys.stderr)
        svc.stop()
        return 2
    except Exception as e:  # anything else at start: said, not a traceback
        print(f"error: cannot start the cache server: {type(e).__name__}: {e}", file=sys.stderr)
        svc.stop()
        return 2
    kinds = " -> ".join(t.kind for t in config.tiers)
    print(f"pdfabric cache-server on tcp://{svc.host}:{svc.port} (http://{svc.host}:{svc.http_port}); "
          f"tiers {kinds}; {config.chunk_tokens}-token chunks", flush=True)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    svc.stop()
    return 0
