"""cuda_ipc where it cannot run: the module imports, says why, refuses with the fix.

Each case runs in a fresh interpreter: the reason is probed once per process, and "no
cupy" is simulated by blocking the import (``sys.modules["cupy"] = None``), "no device" by
hiding every GPU (``CUDA_VISIBLE_DEVICES=""``), so the checks hold on machines with cupy
and a GPU too.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from typing import Any

import pytest

NO_CUPY = "cupy is not installed - pip install 'pdfabric[cuda]'"

_PROBE = """
import json, sys
{prelude}
import pdfabric.transports.cuda_ipc as m
from pdfabric.errors import TransportUnavailable
from pdfabric.transports import available, create
out = {{"reason": m.unavailable_reason(), "available": available()["cuda_ipc"]}}
try:
    create("cuda_ipc").close()
    out["create"] = None
except TransportUnavailable as e:
    out["create"] = [type(e).__name__, e.message, e.transport]
try:
    m.CudaIpcTransport()
    out["direct"] = None
except TransportUnavailable as e:
    out["direct"] = e.message
print(json.dumps(out))
"""


def _probe(prelude: str = "", env: dict[str, str] | None = None) -> dict[str, Any]:
    r = subprocess.run([sys.executable, "-c", _PROBE.format(prelude=prelude)], capture_output=True, text=True, check=False,
                       timeout=60, env={**os.environ, **(env or {})})  # fmt: skip
    assert r.returncode == 0, r.stderr
    out: dict[str, Any] = json.loads(r.stdout.strip().splitlines()[-1])
    return out


def test_without_cupy_the_module_imports_and_says_how_to_install_it() -> None:
    out = _probe('sys.modules["cupy"] = None  # import cupy -> ImportError')
    assert out["reason"] == NO_CUPY
    assert out["available"] == f"transport 'cuda_ipc' is not available: {NO_CUPY}"
    assert out["create"] == ["TransportUnavailable", out["available"], "cuda_ipc"]
    assert out["direct"] == out["available"]


@pytest.mark.skipif(importlib.util.find_spec("cupy") is None, reason="cupy is not installed (the no-device case needs it)")
def test_without_a_cuda_device_the_reason_says_so() -> None:
    out = _probe(env={"CUDA_VISIBLE_DEVICES": ""})
    assert out["reason"].startswith("no CUDA device"), out
    assert "NVIDIA GPU" in out["reason"]
    assert out["available"] == f"transport 'cuda_ipc' is not available: {out['reason']}"
    assert out["create"] == ["TransportUnavailable", out["available"], "cuda_ipc"]


def test_nothing_is_opened_before_the_refusal() -> None:
    """The device check comes first: no listening socket or thread is left behind."""
    prelude = 'sys.modules["cupy"] = None\nimport threading, os\nbefore = (threading.active_count(), len(os.listdir("/proc/self/fd")))'
    code = _PROBE.format(prelude=prelude).replace(
        "print(json.dumps(out))",
        'out["leak"] = [threading.active_count() - before[0], len(os.listdir("/proc/self/fd")) - before[1]]\n'
        "print(json.dumps(out))",
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["leak"] == [0, 0]


def _bench(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pdfabric.cli", "bench", "transfer", *args], capture_output=True, check=False,
                          text=True, timeout=60, env={**os.environ, **(env or {})})  # fmt: skip


def test_bench_refuses_cuda_ipc_with_the_reason_and_exit_2() -> None:
    r = _bench("--transport", "cuda_ipc", "--device", "cuda", "--rounds", "3", env={"CUDA_VISIBLE_DEVICES": ""})
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    assert "error: --transport cuda_ipc: transport 'cuda_ipc' is not available: " in r.stderr
    assert NO_CUPY in r.stderr or "no CUDA device" in r.stderr, r.stderr


def test_bench_device_flag_refusals_exit_2() -> None:
    r = _bench("--transport", "tcp", "--device", "cuda")
    assert r.returncode == 2 and "--transport tcp: it cannot move GPU memory" in r.stderr, r.stderr
    r = _bench("--transport", "shm,cuda_ipc")
    assert r.returncode == 2 and "--transport cuda_ipc:" in r.stderr and "Traceback" not in r.stderr, r.stderr
