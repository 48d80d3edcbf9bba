"""Checks of a topology that span fields, and how their problems are reported.

Each ``check_*`` takes a validated ``Topology`` and returns every problem it finds as
``(path, message)``; ``Topology`` runs them all and raises ``FieldProblems``, which the
loader turns into one ``ConfigError`` line per problem. Messages name both places of a
clash (``instances[1].port: 8100 is already used by instances[0].port``).

Hosts are compared by name, with the loopback names taken as one host and a wildcard
bind address (``0.0.0.0``, ``::``) clashing with loopback and wildcard binds of the same
port; whether two different names are one machine is not known here.
"""

from __future__ import annotations

import difflib
from typing import TYPE_CHECKING

from pdfabric.errors import ConfigError

if TYPE_CHECKING:
    from pdfabric.config.models import Instance, Topology, TransportConfig

__all__ = [
    "Problem",
    "FieldProblems",
    "problems_error",
    "same_host",
    "unknown_name",
    "SAME_HOST_TRANSPORTS",
    "topology_problems",
]

Problem = tuple[str, str]
"""``(path, message)``; the path is relative to the model that found the problem."""

SAME_HOST_TRANSPORTS = frozenset({"shm", "cuda_ipc"})

_LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})
_WILDCARD = frozenset({"0.0.0.0", "::"})
_TIER_RANK = {"memory": 0, "disk": 1, "redis": 2, "s3": 2}


class FieldProblems(ValueError):
    """Several problems found by one validator, each ``(relative path, message)``."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(f"{p}: {m}" if p else m for p, m in self.problems))


def problems_error(problems: list[Problem], source: str | None) -> ConfigError:
    """One ``ConfigError`` whose str has one ``source: path: message`` line per problem."""
    (path, msg), rest = problems[0], problems[1:]
    lines = [msg] + [": ".join(x for x in (source, p, m) if x) for p, m in rest]
    return ConfigError("\n".join(lines), path=path or None, source=source)


def same_host(a: str, b: str) -> bool:
    """Whether two host names certainly name one machine."""
    return a == b or (a in _LOOPBACK and b in _LOOPBACK)


def _may_collide(a: str, b: str) -> bool:
    local = _LOOPBACK | _WILDCARD
    return same_host(a, b) or (a in _WILDCARD and b in local) or (b in _WILDCARD and a in local)


def unknown_name(name: str, names: list[str]) -> str:
    """``no instance named 'x'; did you mean 'y'?`` (or the list of names)."""
    close = difflib.get_close_matches(name, names, n=1)
    hint = f"did you mean {close[0]!r}?" if close else f"instances are: {', '.join(names)}"
    return f"no instance named {name!r}; {hint}"


def topology_problems(topo: Topology) -> list[Problem]:
    """Every cross-field problem of ``topo``, in file order of the checks."""
    return [
        *check_names(topo),
        *check_roles(topo),
        *check_ports(topo),
        *check_links(topo),
        *check_default_transport(topo),
        *check_cache(topo),
        *check_proxy(topo),
    ]


def check_names(topo: Topology) -> list[Problem]:
    """Instance names are unique."""
    first: dict[str, int] = {}
    problems: list[Problem] = []
    for i, inst in enumerate(topo.instances):
        if inst.name in first:
            msg = f"{inst.name!r} is already the name of instances[{first[inst.name]}]"
            problems.append((f"instances[{i}].name", msg))
        first.setdefault(inst.name, i)
    return problems


def check_roles(topo: Topology) -> list[Problem]:
    """Some instance can prefill and some can decode (``both`` counts for each)."""
    problems: list[Problem] = []
    if not topo.prefill_instances:
        problems.append(("instances", "no instance can prefill; give one role prefill or both"))
    if not topo.decode_instances:
        problems.append(("instances", "no instance can decode; give one role decode or both"))
    for i, inst in enumerate(topo.instances):
        if inst.can_prefill and inst.control_port is None:
            problems.append((f"instances[{i}].control_port",
                             f"a {inst.role} instance needs a control_port: decode engines dial it for the KV"))
        if 0 < len(inst.devices) < inst.tensor_parallel_size:
            problems.append((f"instances[{i}].devices",
                             f"tensor_parallel_size {inst.tensor_parallel_size} needs a device per rank; "
                             f"{len(inst.devices)} listed"))
    return problems


def _bound_ports(topo: Topology) -> list[tuple[str, str, int]]:
    ports: list[tuple[str, str, int]] = []
    for i, inst in enumerate(topo.instances):
        ports.append((f"instances[{i}].port", inst.host, inst.port))
        if inst.control_port is not None:
            ports.append((f"instances[{i}].control_port", inst.host, inst.control_port))
            for rank in range(1, inst.tensor_parallel_size):  # each tensor-parallel rank binds port + rank
                ports.append((f"instances[{i}].control_port (+{rank}, tensor-parallel rank {rank})",
                              inst.host, inst.control_port + rank))
    if topo.cache is not None and topo.cache.server is not None:
        srv = topo.cache.server
        ports.append(("cache.server.port", srv.host, srv.port))
        http = "cache.server.http_port" if srv.http_port is not None else "cache.server.http_port (port + 1)"
        ports.append((http, srv.host, srv.http))
    ports.append(("proxy.port", topo.proxy.host, topo.proxy.port))
    return ports


def check_ports(topo: Topology) -> list[Problem]:
    """No two listeners (engines, control endpoints, cache server, proxy) share a port."""
    ports = _bound_ports(topo)
    problems: list[Problem] = []
    for n, (path, host, port) in enumerate(ports):
        if port > 65535:  # a derived port (rank offset, http = port + 1); the set ones are range-checked
            problems.append((path, f"comes to {port}, past the last port 65535"))
            continue
        for other, other_host, other_port in ports[:n]:
            if port == other_port and _may_collide(host, other_host):
                where = "" if host == other_host else f" ({other_host} and {host} overlap)"
                problems.append((path, f"{port} is already used by {other}{where}"))
                break
    return problems


def _link_end_problems(topo: Topology, i: int) -> list[Problem]:
    by_name = {inst.name: inst for inst in topo.instances}
    link = topo.links[i]
    problems: list[Problem] = []
    for side, name in (("prefill", link.prefill), ("decode", link.decode)):
        inst = by_name.get(name)
        if inst is None:
            problems.append((f"links[{i}].{side}", unknown_name(name, list(by_name))))
        elif not (inst.can_prefill if side == "prefill" else inst.can_decode):
            msg = f"expected an instance with role {side} or both, got {name!r} (role {inst.role})"
            problems.append((f"links[{i}].{side}", msg))
    return problems


def check_links(topo: Topology) -> list[Problem]:
    """Links join two existing, distinct instances of the right roles, once per pair, with
    the topology's transport (an engine has one transport for all its peers)."""
    problems: list[Problem] = []
    seen: dict[tuple[str, str], int] = {}
    for i, link in enumerate(topo.links):
        ends = _link_end_problems(topo, i)
        pair = (link.prefill, link.decode)
        if ends:
            problems.extend(ends)
        elif link.prefill == link.decode:
            msg = f"expected two different instances, got {link.prefill!r} twice"
            problems.append((f"links[{i}]", msg))
        elif pair in seen:
            msg = f"{link.prefill} -> {link.decode} is already configured by links[{seen[pair]}]"
            problems.append((f"links[{i}]", msg))
        elif link.transport != topo.transport:
            # every engine builds one transport, the topology's, and uses it with all its
            # peers: a pair's own transport would be shown and checked but never used
            msg = (f"expected the topology's transport ({_differs(topo.transport, link.transport)}): "
                   "an engine speaks one transport with all its peers, so a pair cannot have its own; "
                   "set the top-level 'transport' instead")
            problems.append((f"links[{i}].transport", msg))
        else:
            msg = same_host_problem(link.transport, topo.instance(link.prefill), topo.instance(link.decode))
            if msg is not None:
                problems.append((f"links[{i}].transport", msg))
        seen.setdefault(pair, i)
    return problems


def _differs(want: TransportConfig, got: TransportConfig) -> str:
    """How a link's transport differs from the topology's: kinds, or the options that differ."""
    if want.kind != got.kind:
        return f"{want.kind}, got {got.kind}"
    a, b = want.model_dump(mode="json"), got.model_dump(mode="json")
    keys = [k for k in a if a[k] != b.get(k)]
    return ", ".join(f"{k}: {a[k]}" for k in keys) + ", got " + ", ".join(f"{k}: {b.get(k)}" for k in keys)


def same_host_problem(transport: TransportConfig, p: Instance, d: Instance) -> str | None:
    """Why ``transport`` cannot join ``p`` and ``d`` (a same-host transport across hosts)."""
    if transport.kind not in SAME_HOST_TRANSPORTS or same_host(p.host, d.host):
        return None
    return (
        f"{transport.kind} works only between instances on one host, but {p.name!r} is on "
        f"{p.host} and {d.name!r} on {d.host}; use tcp, nixl or ucx"
    )


def check_default_transport(topo: Topology) -> list[Problem]:
    """The default transport can join every pair that no link overrides."""
    overridden = {(link.prefill, link.decode) for link in topo.links}
    for p in topo.prefill_instances:
        for d in topo.decode_instances:
            if p.name == d.name or (p.name, d.name) in overridden:
                continue
            msg = same_host_problem(topo.transport, p, d)
            if msg is not None:
                return [("transport", f"{msg} for the whole topology (a link cannot use another transport than "
                                      "the topology's), or put the two instances on one host")]
    return []


def check_cache(topo: Topology) -> list[Problem]:
    """Tiers go memory, disk, redis/s3, each kind once; chunks hold whole KV blocks."""
    if topo.cache is None:
        return []
    problems: list[Problem] = []
    seen: dict[str, int] = {}
    for i, tier in enumerate(topo.cache.tiers):
        if tier.kind in seen:
            first = f"cache.tiers[{seen[tier.kind]}]"
            msg = f"a second {tier.kind} tier; each kind may appear once (see {first})"
            problems.append((f"cache.tiers[{i}]", msg))
            continue
        later = [k for k in seen if _TIER_RANK[k] > _TIER_RANK[tier.kind]]
        if later:
            msg = f"a {tier.kind} tier must come before {later[0]} (order: memory, disk, redis/s3)"
            problems.append((f"cache.tiers[{i}]", msg))
        seen[tier.kind] = i
    bs, ct = topo.model.block_size, topo.cache.chunk_tokens
    if ct % bs:
        msg = f"expected a multiple of model.block_size ({bs}), got {ct}"
        problems.append(("cache.chunk_tokens", msg))
    return problems


def check_proxy(topo: Topology) -> list[Problem]:
    """``proxy.cache_lookup`` needs a cache server the proxy can ask."""
    if topo.proxy.cache_lookup and (topo.cache is None or topo.cache.server is None):
        where = "no cache section" if topo.cache is None else "a cache without a server (in-process tiers)"
        msg = (f"expected a cache server to ask (cache.server: {{host, port}}), got {where}; add one or "
               "set cache_lookup: false")
        return [("proxy.cache_lookup", msg)]
    return []
