"""``pdfabric status`` against a running proxy (fake engines behind it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

from pdfabric.transports._procs import proc_start
from proxy_harness import Stack

pytestmark = [pytest.mark.integration]


def status(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pdfabric.cli", "status", *args], capture_output=True, text=True,
                          timeout=60, env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"})


def test_status_lists_instances_health_and_load(make_stack: Callable[..., Stack]) -> None:
    s = make_stack(prefills=1, decodes=1)
    assert s.complete().status_code == 200
    r = status(s.url, "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    names = {i["name"]: i for i in data["instances"]}
    assert len(names) == 2 and all(i["healthy"] for i in names.values())
    assert sum(i["served"] for i in names.values()) >= 1
    assert "pdfabric_proxy_requests_total 1" in data["metrics"]
    table = status(s.url)
    assert table.returncode == 0 and "pdfabric status" in table.stdout and "up" in table.stdout


def test_status_without_a_proxy_says_so() -> None:
    r = status("http://127.0.0.1:9")
    assert r.returncode == 1 and "cannot read the proxy at http://127.0.0.1:9" in r.stderr


def _topology(tmp_path, secret: str = "") -> str:
    from pathlib import Path

    text = (Path(__file__).parents[2] / "configs" / "cpu-1p1d-tcp.yaml").read_text()
    path = tmp_path / "topo.yaml"
    path.write_text(text + secret)
    return str(path)


def test_status_with_a_topology_without_secret_says_why_no_connector_answered(
        make_stack: Callable[..., Stack], tmp_path) -> None:  # fmt: skip
    s = make_stack(prefills=1, decodes=1)
    topo = _topology(tmp_path)
    r = status(s.url, "--topology", topo, "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert set(data["connectors"]) == {"prefill-0", "decode-0"}
    assert all("error" in c for c in data["connectors"].values())
    assert "names no secret" in data["connectors_note"]
    table = status(s.url, "--topology", topo)
    assert table.returncode == 0 and "no connector answered" in table.stdout and "set `secret:`" in table.stdout
    assert "connector of prefill-0:" in table.stdout


def test_status_shows_a_connector_that_does_not_answer(make_stack: Callable[..., Stack], tmp_path) -> None:
    s = make_stack(prefills=1, decodes=1)
    topo = _topology(tmp_path, "secret: {env: PDFABRIC_STATUS_TEST_SECRET}\n")
    env = {"COLUMNS": "200", "PATH": "/usr/bin:/bin", "PDFABRIC_STATUS_TEST_SECRET": "s3cret"}
    r = subprocess.run([sys.executable, "-m", "pdfabric.cli", "status", s.url, "--topology", topo],
                       capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 0, r.stderr
    # no engine runs behind the control ports of cpu-1p1d-tcp.yaml (8101, 8201): each says so
    assert "connector of prefill-0:" in r.stdout and "connector of decode-0:" in r.stdout


@pytest.mark.parametrize("proxy_up", [True, False])
def test_status_with_an_unusable_topology_exits_2_without_a_traceback(
        make_stack: Callable[..., Stack], tmp_path, proxy_up: bool) -> None:  # fmt: skip
    url = make_stack(prefills=1, decodes=1).url if proxy_up else "http://127.0.0.1:9"
    missing = status(url, "--topology", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 2 and "nope.yaml" in missing.stderr and "Traceback" not in missing.stderr
    unset = status(url, "--topology", _topology(tmp_path, "secret: {env: PDFABRIC_STATUS_UNSET_SECRET}\n"))
    assert unset.returncode == 2 and "PDFABRIC_STATUS_UNSET_SECRET" in unset.stderr
    assert "Traceback" not in unset.stderr


def test_status_finds_a_running_launch_from_its_log_dir(make_stack: Callable[..., Stack], tmp_path) -> None:
    """No URL, no --topology: the launch's launch.json names its proxy and topology (and
    the per-launch secret's file); a log dir without one means the default URL."""
    s = make_stack(prefills=1, decodes=1)
    logs = tmp_path / "logs"
    logs.mkdir()
    secret = logs / "launch-secret"
    secret.write_text("per-launch")
    record = {"topology": _topology(tmp_path), "proxy": s.url, "secret_file": str(secret), "pid": os.getpid()}
    (logs / "launch.json").write_text(json.dumps(record))
    r = status("--log-dir", str(logs), "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert {i["name"] for i in data["instances"]} == {"p0", "d0"}  # the fake stack's proxy
    assert set(data["connectors"]) == {"prefill-0", "decode-0"}  # the topology's engines were asked
    assert "connectors_note" not in data  # a secret was at hand: no "names no secret" advice
    gone = status("--log-dir", str(tmp_path / "no-launch-here"))
    assert gone.returncode == 1 and "http://127.0.0.1:8000" in gone.stderr
    env_secret = tmp_path / "env-secret.yaml"  # the launch's secret is in its environment, not ours
    env_secret.write_text(Path(_topology(tmp_path)).read_text() + "secret: {env: PDFABRIC_STATUS_LAUNCH_ONLY}\n")
    (logs / "launch.json").write_text(json.dumps({**record, "topology": str(env_secret), "secret_file": None}))
    r = status("--log-dir", str(logs), "--json")
    assert r.returncode == 0, r.stderr
    assert "connectors not asked" in json.loads(r.stdout)["connectors_note"]
    assert "PDFABRIC_STATUS_LAUNCH_ONLY" in json.loads(r.stdout)["connectors_note"]
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (logs / "launch.json").write_text(json.dumps({**record, "pid": int(dead.stdout)}))  # a launch killed
    stale = status("--log-dir", str(logs))
    assert stale.returncode == 1 and "http://127.0.0.1:8000" in stale.stderr  # its record is not used
    # a killed launch whose pid the kernel gave to another process: the start time differs
    (logs / "launch.json").write_text(json.dumps({**record, "pid_start": proc_start(os.getpid()) + 1}))
    reused = status("--log-dir", str(logs))
    assert reused.returncode == 1 and "http://127.0.0.1:8000" in reused.stderr
    (logs / "launch.json").write_text(json.dumps({**record, "pid_start": proc_start(os.getpid())}))
    assert status("--log-dir", str(logs), "--json").returncode == 0  # the same process: found


def test_status_says_what_to_do_when_it_cannot_read_the_proxy(tmp_path, make_stack: Callable[..., Stack]) -> None:
    none = status("--log-dir", str(tmp_path / "no-launch-here"))
    assert none.returncode == 1 and "no launch is running with the log directory" in none.stderr, none.stderr
    s = make_stack(prefills=1, decodes=1, api_keys=("k1",))
    locked = status(s.url)
    assert locked.returncode == 1 and "give one with --api-key" in locked.stderr, locked.stderr
    wrong = status(s.url, "--api-key", "nope")
    assert wrong.returncode == 1 and "refused the key given with --api-key" in wrong.stderr, wrong.stderr
    bare = status(s.url.removeprefix("http://"), "--api-key", "k1", "--json")  # host:port
    assert bare.returncode == 0, bare.stderr
    assert {i["name"] for i in json.loads(bare.stdout)["instances"]} == {"p0", "d0"}


def test_status_takes_a_built_in_topology_by_name(make_stack: Callable[..., Stack]) -> None:
    s = make_stack(prefills=1, decodes=1)
    r = status(s.url, "--topology", "cpu-1p1d-tcp", "--json")
    assert r.returncode == 0, r.stderr
    assert set(json.loads(r.stdout)["connectors"]) == {"prefill-0", "decode-0"}
