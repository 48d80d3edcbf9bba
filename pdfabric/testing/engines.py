"""Real vLLM engines (OpenAI servers) as child processes, for tests and benchmarks.

``Engine`` starts ``python -m vllm.entrypoints.openai.api_server`` in its own process
group with the KV connector of choice, waits for ``/health`` (failing early, with the
log's tail, if the process dies), talks HTTP with the standard library, and always
stops what it started: SIGTERM to its process group, SIGKILL after a grace period.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pdfabric.launch.plan import CPU_COMPILE_ENV, detect_platform

__all__ = ["EngineSpec", "Engine", "EngineError", "http_json", "connector_config", "parse_metrics"]


class EngineError(RuntimeError):
    pass


@dataclass
class EngineSpec:
    name: str
    port: int
    model: Path
    log_dir: Path
    kv_transfer_config: dict[str, Any] | None = None
    # VLLM_CPU_OMP_THREADS_BIND, e.g. "0"; every process of the engine (API server, engine
    # core, worker) is confined to these cores, so one engine's polling never lands on the
    # core the other engine computes on
    cores: str | None = None
    block_size: int = 32
    max_model_len: int = 4096
    kv_cache_gib: int = 1
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)


def connector_config(role: str, extra: dict[str, Any] | None = None, *, connector: str = "pdfabric") -> dict[str, Any]:
    """A ``--kv-transfer-config`` for pdfabric, or vLLM's own ``nixl`` / ``example`` connectors."""
    if connector == "pdfabric":
        cfg: dict[str, Any] = {
            "kv_connector": "PDFabricConnector",
            "kv_connector_module_path": "pdfabric.connector.vllm",
            "kv_role": role,
            "kv_load_failure_policy": "recompute",
        }
    elif connector == "nixl":
        cfg = {"kv_connector": "NixlConnector", "kv_role": role}
    elif connector == "example":
        cfg = {"kv_connector": "ExampleConnector", "kv_role": role}
    else:
        raise ValueError(f"unknown connector {connector!r}; expected pdfabric, nixl or example")
    if extra:
        cfg["kv_connector_extra_config"] = extra
    return cfg


def http_json(url: str, body: dict[str, Any] | None = None, timeout: float = 120.0) -> dict[str, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as e:
        raise EngineError(f"{url}: HTTP {e.code}: {e.read()[:500].decode(errors='replace')}") from None


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {"name{labels}": value}, plus "name" summed over label sets."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        try:
            v = float(value)
        except ValueError:
            continue
        out[key] = v
        name = key.split("{", 1)[0]
        if name != key:
            out[name] = out.get(name, 0.0) + v
    return out


class Engine:
    def __init__(self, spec: EngineSpec) -> None:
        self.spec = spec
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = spec.log_dir / f"{spec.name}.log"
        self.url = f"http://127.0.0.1:{spec.port}"

    def command(self) -> list[str]:
        s = self.spec
        cmd = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(s.model), "--served-model-name", "tiny-llama",
            "--host", "127.0.0.1", "--port", str(s.port),
            "--block-size", str(s.block_size), "--max-model-len", str(s.max_model_len),
            "--max-num-seqs", "16",
        ]
        if s.kv_transfer_config is not None:
            cmd += ["--kv-transfer-config", json.dumps(s.kv_transfer_config)]
        return cmd + s.extra_args

    def start(self) -> "Engine":
        s = self.spec
        env = dict(os.environ)
        env.update({"VLLM_HOST_IP": "127.0.0.1", "VLLM_CPU_KVCACHE_SPACE": str(s.kv_cache_gib),
                    "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
                    "DO_NOT_TRACK": "1", "PYTHONUNBUFFERED": "1"})
        if s.cores is not None:
            env["VLLM_CPU_OMP_THREADS_BIND"] = s.cores
        if detect_platform() == "cpu":  # as the launcher does (see CPU_COMPILE_ENV)
            for key, value in CPU_COMPILE_ENV.items():
                env.setdefault(key, value)
        env.update(s.env)
        s.log_dir.mkdir(parents=True, exist_ok=True)
        cpus = {int(c) for c in s.cores.split(",")} if s.cores else None
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True, stdin=subprocess.DEVNULL,
                                         preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)
        return self

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def wait_ready(self, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise EngineError(f"engine {self.spec.name} exited (code {self.proc and self.proc.returncode}):\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        raise EngineError(f"engine {self.spec.name} not ready after {timeout:g}s:\n{self.log_tail()}")

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the whole engine (peer-death tests)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)

    def stop(self, grace: float = 20.0) -> None:
        p = self.proc
        if p is None:
            return
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
                p.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        try:  # the engine core and any worker share the group; never leave them behind
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if p.poll() is None:
            p.wait(10)

    def metrics(self) -> dict[str, float]:
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as r:
            return parse_metrics(r.read().decode())

    def complete(self, body: dict[str, Any], timeout: float = 300.0) -> dict[str, Any]:
        return http_json(self.url + "/v1/completions", {"model": "tiny-llama", **body}, timeout)

    def __enter__(self) -> "Engine":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
