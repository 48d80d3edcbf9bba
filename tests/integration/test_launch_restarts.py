"""``pdfabric launch`` keeping a topology up: processes that die, hang or never get ready
again are restarted (up to ``--max-restarts``), a log directory belongs to one live launch,
and a restarted proxy keeps its admin changes - each leaving no process behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from launch_helpers import (assert_all_gone, kill_process, launch, new_pid, serve_proxy_only, start_launch,
                            stop_launch, wait_for_text, wait_healthy_in_proxy, write_topology)

from pdfabric.launch.record import live_record
from pdfabric.transports._procs import proc_start

pytestmark = [pytest.mark.integration]


def test_a_process_that_dies_is_restarted_until_max_restarts(tmp_path: Path) -> None:
    """--restart always (the default): a killed proxy is started again (same port, log
    appended); its second death within the window is over --max-restarts 1: the launch
    stops, exit 1, saying why, with nothing left running."""
    proc, logs, err, port = serve_proxy_only(tmp_path, "--max-restarts", "1")
    try:
        first = kill_process(logs, "proxy")
        wait_for_text(proc, err, "proxy is ready again", 60)
        second = new_pid(logs, "proxy", first)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/live", timeout=5) as resp:
            assert resp.status == 200
        out = err.read_text()
        assert "proxy exited with code -9; restarting it in 1s (restart 1 of at most 1 within 10 minutes)" in out
        assert "--- pdfabric launch: restart 1 at " in (logs / "proxy.log").read_text()
        kill_process(logs, "proxy")
        assert proc.wait(60) == 1
    finally:
        stop_launch(proc, ("--log-dir", str(logs)))
    out = err.read_text()
    assert "stopped: proxy exited with code -9; it ended 2 times within 10 minutes, more than --max-restarts 1" in out, out[-3000:]
    assert int(json.loads((logs / "pids.json").read_text())["proxy"]) == second
    assert_all_gone(logs)


def test_a_log_directory_in_use_by_a_running_launch_is_refused(tmp_path: Path) -> None:
    topo = write_topology(tmp_path / "t.yaml", model={"path": str(tmp_path / "no-model-here"), "block_size": 32})
    logs = tmp_path / "logs"
    logs.mkdir()
    record = {"topology": str(topo), "proxy": None, "secret_file": None, "pid": os.getpid()}  # alive
    (logs / "launch.json").write_text(json.dumps(record))
    r = launch(str(topo), "--only", "proxy", "--log-dir", str(logs))
    assert r.returncode == 2 and f"belongs to the launch running as pid {os.getpid()}" in r.stderr, r.stderr
    assert not (logs / "pids.json").exists()  # nothing started
    assert json.loads((logs / "launch.json").read_text()) == record  # and the other's record kept


def test_a_record_whose_pid_was_reused_does_not_hold_the_log_directory(tmp_path: Path) -> None:
    """A launch killed with SIGKILL leaves launch.json behind; when its pid now names
    another process (another start time), the directory is free and a new launch serves."""
    logs = tmp_path / "logs"
    logs.mkdir()
    stale = {"topology": "gone.yaml", "proxy": None, "secret_file": None, "pid": os.getpid(),
             "pid_start": proc_start(os.getpid()) + 1}  # fmt: skip
    (logs / "launch.json").write_text(json.dumps(stale))
    proc, logs, err, port = serve_proxy_only(tmp_path)
    try:
        record = live_record(logs)
        assert record is not None and record["pid"] == proc.pid and record["pid_start"] == proc_start(proc.pid)
    finally:
        stop_launch(proc, ("--log-dir", str(logs)))
    assert not (logs / "launch.json").exists()
    assert_all_gone(logs)


def test_a_hung_process_is_killed_and_restarted(tmp_path: Path) -> None:
    """Alive but not answering (stopped with SIGSTOP, as a deadlock would leave it): after
    --hang-timeout the launcher kills its group and starts it again."""
    proc, logs, err, port = serve_proxy_only(tmp_path, "--hang-timeout", "2")
    try:
        frozen = int(json.loads((logs / "pids.json").read_text())["proxy"])
        os.kill(frozen, signal.SIGSTOP)
        wait_for_text(proc, err, "proxy is ready again", 60)
        out = err.read_text()
        assert f"proxy has not answered http://127.0.0.1:{port}/live for " in out and "killing it" in out, out
        assert new_pid(logs, "proxy", frozen) != frozen
        assert not Path(f"/proc/{frozen}").exists() or Path(f"/proc/{frozen}/stat").read_text().split()[2] == "Z"
    finally:
        stop_launch(proc, ("--log-dir", str(logs)))
    assert proc.returncode == 0, err.read_text()[-3000:]
    assert_all_gone(logs)


def test_a_process_not_ready_after_its_restart_is_killed_and_restarted_again(tmp_path: Path) -> None:
    """A restart that hangs while starting (stopped at once, before it serves) is not the
    end of the launch: after --timeout it is killed, counted as another end, and started again."""
    proc, logs, err, port = serve_proxy_only(tmp_path, "--timeout", "15")
    try:
        first = kill_process(logs, "proxy")
        stuck = new_pid(logs, "proxy", first, timeout=30, poll=0.02)
        os.kill(stuck, signal.SIGSTOP)  # long before it could serve (a Python start takes ~1 s)
        third = new_pid(logs, "proxy", stuck, timeout=60)
        wait_for_text(proc, err, "proxy is ready again", 60)
        out = err.read_text()
        assert "proxy was not ready again 15s after its restart: killing it" in out, out[-3000:]
        assert "restart 2 of at most 3" in out, out[-3000:]
        assert third not in (first, stuck) and proc.poll() is None
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/live", timeout=5) as r:
            assert r.status == 200
    finally:
        stop_launch(proc, ("--log-dir", str(logs)))
    assert proc.returncode == 0, err.read_text()[-3000:]
    assert_all_gone(logs)


def test_a_restarted_proxy_keeps_admin_changes_and_a_new_launch_starts_from_the_topology(tmp_path: Path) -> None:
    proc, logs, err, port = serve_proxy_only(tmp_path)
    admin = f"http://127.0.0.1:{port}/admin/instances"
    try:
        urllib.request.urlopen(urllib.request.Request(admin + "/decode-0/drain", method="POST"), timeout=5).close()
        first = kill_process(logs, "proxy")
        new_pid(logs, "proxy", first)
        wait_for_text(proc, err, "proxy is ready again", 60)
        with urllib.request.urlopen(admin, timeout=5) as r:
            assert {i["name"]: i["draining"] for i in json.loads(r.read())["instances"]} == {
                "prefill-0": False, "decode-0": True}
    finally:
        stop_launch(proc, ("--log-dir", str(logs)))
    assert proc.returncode == 0, err.read_text()[-3000:]
    proc, logs, err, port = serve_proxy_only(tmp_path)  # the same log directory, a new launch
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/admin/instances", timeout=5) as r:
            assert all(not i["draining"] for i in json.loads(r.read())["instances"])
    finally:
        stop_launch(proc, ("--log-dir", str(logs)))
    assert_all_gone(logs)


def test_restart_never_stops_the_launch_at_the_first_death(tmp_path: Path) -> None:
    proc, logs, err, _ = serve_proxy_only(tmp_path, "--restart", "never")
    try:
        kill_process(logs, "proxy")
        assert proc.wait(60) == 1
    finally:
        stop_launch(proc, ("--log-dir", str(logs)))
    out = err.read_text()
    assert "stopped: proxy exited with code -9; see" in out and "restarting" not in out, out[-3000:]
    assert_all_gone(logs)


@pytest.mark.timeout(900)
def test_crashed_engines_are_restarted_and_serve_transfers_again(tmp_path: Path) -> None:
    """A prefill engine, then a decode engine, killed as a crash would (the whole group):
    each is restarted with its ports and comes back; the next request through the proxy is
    disaggregated again and the new decode engine takes the prompt from a transfer (the
    peers of the dead engine's incarnation are refused as stale and fetched again).
    The topology names no secret: ``pdfabric status --log-dir`` finds the launch and its
    per-launch secret (restarted engines get the same one) and reads the connectors."""
    from pdfabric.testing.fabric import make_prompt

    topo = write_topology(tmp_path / "t.yaml")
    data = yaml.safe_load(topo.read_text())
    proxy = f"http://127.0.0.1:{data['proxy']['port']}"
    logs, err = tmp_path / "logs", tmp_path / "launch.err"
    proc = start_launch(topo, logs, err)
    try:
        wait_for_text(proc, err, "serving; Ctrl-C stops every process", 700)
        assert (logs / "launch-secret").stat().st_mode & 0o777 == 0o600
        assert json.loads((logs / "launch.json").read_text())["proxy"] == proxy
        for n, name in enumerate(("prefill-0", "decode-0")):
            new_pid(logs, name, kill_process(logs, name), timeout=30)
            wait_for_text(proc, err, f"{name} is ready again", 300)
            wait_healthy_in_proxy(proxy, 60)  # its next health probe finds the engine back
            body = {"model": "tiny-llama", "prompt": make_prompt(300, seed=11 + n, vocab=1000), "max_tokens": 4}
            req = urllib.request.Request(proxy + "/v1/completions", json.dumps(body).encode(),
                                         {"content-type": "application/json"})
            with urllib.request.urlopen(req, timeout=120) as resp:
                assert resp.headers["x-pdfabric-prefill"] == "prefill-0"
                assert json.loads(resp.read())["usage"]["prompt_tokens"] == 300
            st = subprocess.run([sys.executable, "-m", "pdfabric.cli", "status", "--log-dir", str(logs), "--json"],
                                capture_output=True, text=True, timeout=60, cwd=tmp_path)
            assert st.returncode == 0, st.stderr
            counters = json.loads(st.stdout)["connectors"]["decode-0"]["counters"]
            assert counters.get("received", 0) >= 1 and counters.get("recomputes", 0) == 0, counters
    finally:
        stop_launch(proc, ("--log-dir", str(logs)))
    assert proc.returncode == 0, err.read_text()[-3000:]
    assert_all_gone(logs)
    assert not (logs / "launch.json").exists() and not (logs / "launch-secret").exists()
