"""Helpers for the ``pdfabric launch`` tests: run a launch as its user would (a child
process), stop it and everything it started by process id, and wait on its output."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml

from pdfabric.testing.fabric import free_port

ROOT = Path(__file__).resolve().parents[2]


def launch(*args: str, timeout: float = 60, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``pdfabric launch``; past ``timeout`` it gets SIGTERM (it stops what it started),
    then SIGKILL, and whatever its ``pids.json`` names is killed too: a launch that
    unexpectedly got going never outlives the test."""
    proc = subprocess.Popen([sys.executable, "-m", "pdfabric.cli", "launch", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "COLUMNS": "200", **(env or {})})
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        finally:
            kill_recorded(args)
        raise AssertionError(f"pdfabric launch {' '.join(args)} did not end within {timeout}s:\n{err[-3000:]}") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def kill_recorded(args: tuple[str, ...]) -> None:
    if "--log-dir" not in args:
        return
    pids = Path(args[args.index("--log-dir") + 1]) / "pids.json"
    if not pids.exists():
        return
    for pid in json.loads(pids.read_text()).values():
        try:
            os.killpg(pid, signal.SIGKILL)  # each process leads its own group (start_new_session)
        except (ProcessLookupError, PermissionError):
            pass


def write_topology(path: Path, base: str = "cpu-1p1d-tcp.yaml", **changes: object) -> Path:
    data = yaml.safe_load((ROOT / "configs" / base).read_text())
    ports = iter(free_port() for _ in range(8))
    for inst in data["instances"]:
        inst["port"], inst["control_port"] = next(ports), next(ports)
    data["proxy"]["port"] = next(ports)
    for key, value in changes.items():
        data[key] = value
    path.write_text(yaml.safe_dump(data))
    return path


def assert_all_gone(log_dir: Path) -> None:
    pids = json.loads((log_dir / "pids.json").read_text())
    assert pids, "the launch started no process"
    for name, pid in pids.items():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        status = Path(f"/proc/{pid}/stat").read_text().split()[2] if Path(f"/proc/{pid}/stat").exists() else "?"
        assert status == "Z", f"{name} (pid {pid}) is still running"


def start_launch(topo: Path, logs: Path, err: Path, *extra: str) -> subprocess.Popen[bytes]:
    with open(err, "w") as f:
        return subprocess.Popen([sys.executable, "-m", "pdfabric.cli", "launch", str(topo), "--log-dir", str(logs),
                                 *extra], stdout=f, stderr=subprocess.STDOUT, cwd=ROOT,
                                env={**os.environ, "COLUMNS": "200"})


def serve_proxy_only(tmp_path: Path, *extra: str) -> tuple[subprocess.Popen[bytes], Path, Path, int]:
    """``launch --only proxy`` (no model, no engine) until it serves: (launch, log dir, its
    output file, the proxy's port). The caller stops it (``stop_launch``)."""
    topo = write_topology(tmp_path / "t.yaml", model={"path": str(tmp_path / "no-model-here"), "block_size": 32})
    port = yaml.safe_load(topo.read_text())["proxy"]["port"]
    logs, err = tmp_path / "logs", tmp_path / "launch.err"
    proc = start_launch(topo, logs, err, "--only", "proxy", *extra)
    try:
        wait_for_text(proc, err, "serving; Ctrl-C stops every process", 120)
    except BaseException:
        stop_launch(proc, ("--log-dir", str(logs)))
        raise
    return proc, logs, err, port


def kill_process(logs: Path, name: str) -> int:
    """SIGKILL the whole process group of ``name`` (as a crash would end it); its pid."""
    pid = int(json.loads((logs / "pids.json").read_text())[name])
    os.killpg(pid, signal.SIGKILL)
    return pid


def new_pid(logs: Path, name: str, old: int, timeout: float = 30, poll: float = 0.2) -> int:
    deadline = time.monotonic() + timeout
    while (pid := int(json.loads((logs / "pids.json").read_text())[name])) == old:
        assert time.monotonic() < deadline, f"{name} was not restarted within {timeout:g}s"
        time.sleep(poll)
    return pid


def wait_healthy_in_proxy(proxy: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with urllib.request.urlopen(proxy + "/admin/instances", timeout=5) as resp:
            instances = json.loads(resp.read())["instances"]
        if all(i["healthy"] for i in instances):
            return
        assert time.monotonic() < deadline, f"the proxy still sees an engine down: {instances}"
        time.sleep(0.5)


def wait_for_text(proc: subprocess.Popen[bytes], out: Path, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while text not in out.read_text(errors="replace"):
        if proc.poll() is not None:
            raise AssertionError(f"the launch exited with {proc.returncode}:\n{out.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {text!r} within {timeout:g}s:\n{out.read_text()[-3000:]}")
        time.sleep(0.5)


def stop_launch(proc: subprocess.Popen[bytes], args: tuple[str, ...]) -> None:
    """SIGTERM (the launch stops what it started), then SIGKILL; what its pids.json names
    is killed too when it did not end in time."""
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(90)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
        kill_recorded(args)
