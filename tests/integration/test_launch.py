"""``pdfabric launch``: dry runs of every config, preflight refusals, a failing engine, and
the CPU 1P1D demo end to end - each leaving no process behind (checked by process id)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from pdfabric.launch.record import live_record
from pdfabric.testing.fabric import free_port
from pdfabric.transports._procs import proc_start

pytestmark = [pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


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
            _kill_recorded(args)
        raise AssertionError(f"pdfabric launch {' '.join(args)} did not end within {timeout}s:\n{err[-3000:]}") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _kill_recorded(args: tuple[str, ...]) -> None:
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


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_dry_run_prints_every_process(config: Path) -> None:
    platform = "cuda" if config.stem.startswith(("gpu", "multi")) else "cpu"
    r = launch(str(config), "--dry-run", "--platform", platform)
    assert r.returncode == 0, r.stderr
    topo = yaml.safe_load(config.read_text())
    for inst in topo["instances"]:
        assert f'"instance":"{inst["name"]}"' in r.stdout
        assert f"--port {inst['port']}" in r.stdout
    assert "pdfabric.cli proxy --topology" in r.stdout
    assert ("CUDA_VISIBLE_DEVICES" in r.stdout) == (platform == "cuda")
    assert "PDFABRIC_LAUNCH_SECRET=<per-launch secret>" in r.stdout or "secret" in topo


def test_port_clash_is_refused_at_preflight(tmp_path: Path) -> None:
    topo = write_topology(tmp_path / "t.yaml")
    port = yaml.safe_load(topo.read_text())["instances"][0]["port"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        s.listen()
        r = launch(str(topo), "--log-dir", str(tmp_path / "logs"))
    assert r.returncode == 2
    assert f"port 127.0.0.1:{port} (prefill-0) is not free" in r.stderr
    assert not (tmp_path / "logs" / "pids.json").exists()


def test_a_tensor_parallel_ranks_control_port_in_use_is_refused_at_preflight(tmp_path: Path) -> None:
    topo = write_topology(tmp_path / "t.yaml")
    data = yaml.safe_load(topo.read_text())
    prefill = data["instances"][0]
    prefill["tensor_parallel_size"], prefill["devices"] = 2, [0, 1]
    with socket.socket() as s:
        for _ in range(20):  # a control port whose rank-1 neighbour we can hold
            cp = free_port()
            try:
                s.bind(("127.0.0.1", cp + 1))
                break
            except OSError:
                continue
        else:
            pytest.fail("found no free pair of ports")
        s.listen()
        prefill["control_port"] = cp
        topo.write_text(yaml.safe_dump(data))
        r = launch(str(topo), "--log-dir", str(tmp_path / "logs"))
    assert r.returncode == 2, r.stderr
    assert f"port 127.0.0.1:{cp + 1} (prefill-0) is not free" in r.stderr
    assert not (tmp_path / "logs" / "pids.json").exists()


def test_connections_of_a_previous_run_in_time_wait_do_not_block_a_relaunch() -> None:
    """A launch right after another one ended: the ports still have TIME_WAIT connections
    (the side that closed first keeps them ~60 s), and nothing listens. Preflight must not
    refuse them; a listener must still be refused."""
    from pdfabric.launch.plan import ProcSpec
    from pdfabric.launch.preflight import _ports

    with socket.socket() as lst:
        lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lst.bind(("127.0.0.1", 0))
        lst.listen()
        port = lst.getsockname()[1]
        spec = ProcSpec("engine-x", "engine", ["true"], {}, "http://x", (("127.0.0.1", port),))
        cli = socket.create_connection(("127.0.0.1", port))
        conn, _ = lst.accept()
        conn.close()  # the server side closes first: TIME_WAIT on 127.0.0.1:port
        cli.close()
        assert _ports([spec]) and "is not free" in _ports([spec])[0]  # still listening
    assert _ports([spec]) == []  # only TIME_WAIT left


def test_missing_model_is_refused(tmp_path: Path) -> None:
    topo = write_topology(tmp_path / "t.yaml", model={"path": str(tmp_path / "nope"), "block_size": 32})
    r = launch(str(topo))
    assert r.returncode == 2 and "has no config.json" in r.stderr and "model.path" in r.stderr


def test_transport_not_usable_here_is_refused(tmp_path: Path) -> None:
    hidden = tmp_path / "site" / "ucxx"  # the launch sees a ucxx that cannot load
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text("raise ImportError('libucxx.so: cannot open shared object file')\n")
    topo = write_topology(tmp_path / "t.yaml", transport={"kind": "ucx"})
    r = launch(str(topo), "--log-dir", str(tmp_path / "logs"),
               env={"PYTHONPATH": os.pathsep.join([str(hidden.parent), os.environ.get("PYTHONPATH", "")])})
    assert r.returncode == 2 and "transport ucx is not usable here" in r.stderr, r.stderr
    assert "libucxx.so" in r.stderr and "pip install" in r.stderr
    assert not (tmp_path / "logs").exists() or not list((tmp_path / "logs").glob("*.log"))  # nothing started


def test_cuda_ipc_on_cpu_is_refused(tmp_path: Path) -> None:
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    topo = write_topology(tmp_path / "t.yaml", transport={"kind": "cuda_ipc"},
                          model={"path": str(model), "block_size": 32})
    r = launch(str(topo), "--platform", "cpu")
    assert r.returncode == 2 and "cuda_ipc" in r.stderr


@pytest.mark.timeout(600)
def test_engine_that_fails_to_start_stops_the_launch(tmp_path: Path) -> None:
    topo = write_topology(tmp_path / "t.yaml")
    data = yaml.safe_load(topo.read_text())
    # the engine's complaint about the bad value echoes it: text like a log's "[core.py:1]" or
    # a stray closing tag must reach the user verbatim, not be eaten as markup or crash the report
    data["instances"][1]["engine_args"] = {"max-num-seqs": "[core.py:1][/x]"}
    topo.write_text(yaml.safe_dump(data))
    logs = tmp_path / "logs"
    r = launch(str(topo), "--log-dir", str(logs), timeout=500)
    assert r.returncode == 1
    assert "launch failed: decode-0 exited" in r.stderr and "max-num-seqs" in r.stderr
    assert "'[core.py:1][/x]'" in r.stderr and "Traceback" not in r.stderr
    assert_all_gone(logs)


@pytest.mark.timeout(900)
def test_cpu_1p1d_demo_end_to_end(tmp_path: Path) -> None:
    topo = write_topology(tmp_path / "t.yaml")
    logs = tmp_path / "logs"
    r = launch(str(topo), "--demo", "--log-dir", str(logs), timeout=800)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout + r.stderr
    assert "link prefill-0 -> decode-0 (tcp)" in out and "GB/s" in out
    assert "pdfabric demo" in out and "TTFT ms" in out
    assert_all_gone(logs)


@pytest.mark.timeout(900)
def test_cpu_1p1d_cache_demo_twice_with_the_cache_kept_between_launches(tmp_path: Path) -> None:
    """The cache topology as a user runs it, twice: the second launch finds the first one's
    chunks on disk (its link probe must still transfer), and the proxy serves the document's
    questions from the cache."""
    ports = iter(free_port() for _ in range(2))
    cache = {"chunk_tokens": 64, "server": {"host": "127.0.0.1", "port": next(ports), "http_port": next(ports)},
             "tiers": [{"kind": "memory", "size": "256MiB"}, {"kind": "disk", "path": str(tmp_path / "l2"),
                                                               "size": "1GiB"}]}
    topo = write_topology(tmp_path / "t.yaml", base="cpu-1p1d-cache.yaml", cache=cache)
    # checked here: the cache across launches; the lookup's 0.2 s default bound is checked in
    # test_proxy_cache.py and is not what a loaded CI machine should decide here
    data = yaml.safe_load(topo.read_text())
    data["proxy"]["cache_timeout_s"] = 2.0
    topo.write_text(yaml.safe_dump(data))
    for run in (1, 2):
        logs = tmp_path / f"logs-{run}"
        r = launch(str(topo), "--demo", "--log-dir", str(logs), timeout=800)
        assert r.returncode == 0, r.stderr[-3000:]
        out = r.stdout + r.stderr
        assert "link prefill-0 -> decode-0 (tcp)" in out, out[-3000:]
        # the first launch's first question stores the document (a later one finds it); the second
        # launch finds it for every question, in the chunks the first left on disk
        found = re.search(r"shared cache: (\d) of 5 questions found cached tokens", out)
        assert found and (int(found[1]) >= 1 if run == 1 else int(found[1]) == 5), out[-3000:]
        assert "cache-server" in json.loads((logs / "pids.json").read_text())
        assert_all_gone(logs)
    assert any((tmp_path / "l2").rglob("*.kv"))  # the disk tier outlived both cache servers


# -- --only: one launch per host -----------------------------------------------------------


def test_only_prints_just_the_named_processes() -> None:
    config = ROOT / "configs" / "multi-host-2p2d-nixl.yaml"
    r = launch(str(config), "--dry-run", "--platform", "cuda", "--only", "prefill-b, proxy")
    assert r.returncode == 0, r.stderr
    assert re.findall(r"^# (\S+) \(", r.stdout, re.M) == ["prefill-b", "proxy"]
    assert r.stdout.startswith("# platform: cuda (--platform)\n"), r.stdout[:300]
    if "PDFABRIC_SECRET" not in os.environ:  # the topology's secret: a dry run says a launch would need it
        assert "# note: " in r.stdout and "PDFABRIC_SECRET is not set" in r.stdout
    assert '"instance":"prefill-b"' in r.stdout and "VLLM_HOST_IP=10.0.0.12" in r.stdout


@pytest.mark.parametrize(
    ("only", "extra", "expected"),
    [
        ("prefil-0", (), "--only: 'prefil-0' is not a process of this topology; expected some of prefill-0, decode-0, proxy"),
        (" , ", (), "--only: names no process"),
        ("prefill-0", (), "--only: starts some of the engines but"),
        ("prefill-0,decode-0", ("--demo",), "--demo sends its questions through the proxy"),
        ("proxy", ("--demo",), "--demo reads the transfer counters of engines another launch starts (prefill-0, decode-0)"),
    ],
    ids=["unknown-name", "empty", "split-engines-without-secret", "demo-without-proxy", "demo-elsewhere-without-secret"],
)
def test_bad_only_is_refused_before_anything_starts(tmp_path: Path, only: str, extra: tuple[str, ...], expected: str) -> None:
    topo = write_topology(tmp_path / "t.yaml")
    logs = tmp_path / "logs"
    r = launch(str(topo), "--only", only, *extra, "--log-dir", str(logs), env={"COLUMNS": "400"})
    assert r.returncode == 2, r.stderr
    assert expected in " ".join(r.stderr.split()), r.stderr
    assert "Traceback" not in r.stderr and not logs.exists()


def test_only_proxy_starts_no_engine_and_stops_it_on_sigterm(tmp_path: Path) -> None:
    """The proxy's own host: no model is built or checked, no vLLM is needed, no engine's
    port is touched (one is held here), and SIGTERM stops the proxy by its process id."""
    topo = write_topology(tmp_path / "t.yaml", model={"path": str(tmp_path / "no-model-here"), "block_size": 32})
    data = yaml.safe_load(topo.read_text())
    logs = tmp_path / "logs"
    with socket.socket() as held:  # an engine port in use: not this launch's business
        held.bind(("127.0.0.1", data["instances"][0]["port"]))
        held.listen()
        err = tmp_path / "launch.err"
        with open(err, "w") as f:
            proc = subprocess.Popen([sys.executable, "-m", "pdfabric.cli", "launch", str(topo), "--only", "proxy",
                                     "--log-dir", str(logs)], stdout=f, stderr=subprocess.STDOUT, cwd=ROOT,
                                    env={**os.environ, "COLUMNS": "200"})
        try:
            _wait_for_text(proc, err, "serving; Ctrl-C stops every process", 120)
            assert list(json.loads((logs / "pids.json").read_text())) == ["proxy"]
            base = f"http://127.0.0.1:{data['proxy']['port']}"
            with urllib.request.urlopen(base + "/live", timeout=5) as resp:
                assert resp.status == 200
            with pytest.raises(urllib.error.HTTPError) as health:  # ready only once a decode engine is
                urllib.request.urlopen(base + "/health", timeout=5)
            health.value.close()
            assert health.value.code == 503
            assert "not checked here (another launch starts them): prefill-0, decode-0" in err.read_text()
        finally:
            _stop_launch(proc, ("--log-dir", str(logs)))
    assert proc.returncode == 0, err.read_text()[-3000:]
    assert_all_gone(logs)


@pytest.mark.timeout(900)
def test_one_launch_per_host_serves_through_the_proxy(tmp_path: Path) -> None:
    """A deployment spread over hosts, as its user starts it: one ``launch --only`` for the
    prefill engine, one for the decode engine, one for the proxy (``--demo --serve``: it
    waits until the proxy sees the other launches' engines, asks the demo questions, then
    serves), sharing the topology's secret file. A completion through the proxy moves its
    KV from one launch's engine to the other's (the decode connector counts the transfer,
    no recompute); SIGTERM stops each launch and everything it started."""
    from pdfabric.connector.control import query_status

    secret, keys = tmp_path / "secret", tmp_path / "api-keys"
    secret.write_text(os.urandom(16).hex())
    keys.write_text("k-demo,k-other\n")  # the proxy takes API keys: the demo and the wait must send one
    topo = write_topology(tmp_path / "t.yaml", secret={"file": str(secret)})
    data = yaml.safe_load(topo.read_text())
    data["proxy"]["api_keys"] = {"file": str(keys)}
    topo.write_text(yaml.safe_dump(data))
    procs: dict[str, tuple[subprocess.Popen[bytes], Path, Path]] = {}
    try:
        for names, extra in (("proxy", ["--demo", "--serve"]), ("prefill-0", []), ("decode-0", [])):
            logs, err = tmp_path / f"logs-{names}", tmp_path / f"{names}.err"
            with open(err, "w") as f:
                procs[names] = (subprocess.Popen([sys.executable, "-m", "pdfabric.cli", "launch", str(topo), "--only", names,
                                                  "--log-dir", str(logs), *extra], stdout=f, stderr=subprocess.STDOUT,
                                                 cwd=ROOT, env={**os.environ, "COLUMNS": "200"}), logs, err)
        for proc, _, err in procs.values():
            _wait_for_text(proc, err, "serving; Ctrl-C stops every process", 700)
        assert "not checked here (another launch starts them): decode-0\n" in procs["prefill-0"][2].read_text()
        demo = procs["proxy"][2].read_text()
        assert "waiting for the proxy to see every engine healthy" in demo and "TTFT ms" in demo, demo[-3000:]
        from pdfabric.testing.fabric import make_prompt

        proxy = f"http://127.0.0.1:{data['proxy']['port']}"
        body = {"model": "tiny-llama", "prompt": make_prompt(300, seed=7, vocab=1000), "max_tokens": 4}
        req = urllib.request.Request(proxy + "/v1/completions", json.dumps(body).encode(),
                                     {"content-type": "application/json", "authorization": "Bearer k-other"})
        with urllib.request.urlopen(req, timeout=120) as resp:
            answer = json.loads(resp.read())
            assert resp.headers["x-pdfabric-prefill"] == "prefill-0"
        assert answer["choices"][0]["text"] and answer["usage"]["prompt_tokens"] == 300
        decode = data["instances"][1]
        counters = query_status(f"127.0.0.1:{decode['control_port']}", secret.read_text().encode()).counters
        assert counters.get("received", 0) >= 1 and counters.get("recomputes", 0) == 0, counters
    finally:
        for proc, logs, _ in procs.values():
            _stop_launch(proc, ("--log-dir", str(logs)))
    for name, (proc, logs, err) in procs.items():
        assert proc.returncode == 0, f"{name}: {err.read_text()[-3000:]}"
        assert list(json.loads((logs / "pids.json").read_text())) == [name]
        assert_all_gone(logs)


def _start_launch(topo: Path, logs: Path, err: Path, *extra: str) -> subprocess.Popen[bytes]:
    with open(err, "w") as f:
        return subprocess.Popen([sys.executable, "-m", "pdfabric.cli", "launch", str(topo), "--log-dir", str(logs),
                                 *extra], stdout=f, stderr=subprocess.STDOUT, cwd=ROOT,
                                env={**os.environ, "COLUMNS": "200"})


def _serve_proxy_only(tmp_path: Path, *extra: str) -> tuple[subprocess.Popen[bytes], Path, Path, int]:
    """``launch --only proxy`` (no model, no engine) until it serves: (launch, log dir, its
    output file, the proxy's port). The caller stops it (``_stop_launch``)."""
    topo = write_topology(tmp_path / "t.yaml", model={"path": str(tmp_path / "no-model-here"), "block_size": 32})
    port = yaml.safe_load(topo.read_text())["proxy"]["port"]
    logs, err = tmp_path / "logs", tmp_path / "launch.err"
    proc = _start_launch(topo, logs, err, "--only", "proxy", *extra)
    try:
        _wait_for_text(proc, err, "serving; Ctrl-C stops every process", 120)
    except BaseException:
        _stop_launch(proc, ("--log-dir", str(logs)))
        raise
    return proc, logs, err, port


def _kill_process(logs: Path, name: str) -> int:
    """SIGKILL the whole process group of ``name`` (as a crash would end it); its pid."""
    pid = int(json.loads((logs / "pids.json").read_text())[name])
    os.killpg(pid, signal.SIGKILL)
    return pid


def _new_pid(logs: Path, name: str, old: int, timeout: float = 30, poll: float = 0.2) -> int:
    deadline = time.monotonic() + timeout
    while (pid := int(json.loads((logs / "pids.json").read_text())[name])) == old:
        assert time.monotonic() < deadline, f"{name} was not restarted within {timeout:g}s"
        time.sleep(poll)
    return pid


def test_a_process_that_dies_is_restarted_until_max_restarts(tmp_path: Path) -> None:
    """--restart always (the default): a killed proxy is started again (same port, log
    appended); its second death within the window is over --max-restarts 1: the launch
    stops, exit 1, saying why, with nothing left running."""
    proc, logs, err, port = _serve_proxy_only(tmp_path, "--max-restarts", "1")
    try:
        first = _kill_process(logs, "proxy")
        _wait_for_text(proc, err, "proxy is ready again", 60)
        second = _new_pid(logs, "proxy", first)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/live", timeout=5) as resp:
            assert resp.status == 200
        out = err.read_text()
        assert "proxy exited with code -9; restarting it in 1s (restart 1 of at most 1 within 10 minutes)" in out
        assert "--- pdfabric launch: restart 1 at " in (logs / "proxy.log").read_text()
        _kill_process(logs, "proxy")
        assert proc.wait(60) == 1
    finally:
        _stop_launch(proc, ("--log-dir", str(logs)))
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
    proc, logs, err, port = _serve_proxy_only(tmp_path)
    try:
        record = live_record(logs)
        assert record is not None and record["pid"] == proc.pid and record["pid_start"] == proc_start(proc.pid)
    finally:
        _stop_launch(proc, ("--log-dir", str(logs)))
    assert not (logs / "launch.json").exists()
    assert_all_gone(logs)


def test_a_hung_process_is_killed_and_restarted(tmp_path: Path) -> None:
    """Alive but not answering (stopped with SIGSTOP, as a deadlock would leave it): after
    --hang-timeout the launcher kills its group and starts it again."""
    proc, logs, err, port = _serve_proxy_only(tmp_path, "--hang-timeout", "2")
    try:
        frozen = int(json.loads((logs / "pids.json").read_text())["proxy"])
        os.kill(frozen, signal.SIGSTOP)
        _wait_for_text(proc, err, "proxy is ready again", 60)
        out = err.read_text()
        assert f"proxy has not answered http://127.0.0.1:{port}/live for " in out and "killing it" in out, out
        assert _new_pid(logs, "proxy", frozen) != frozen
        assert not Path(f"/proc/{frozen}").exists() or Path(f"/proc/{frozen}/stat").read_text().split()[2] == "Z"
    finally:
        _stop_launch(proc, ("--log-dir", str(logs)))
    assert proc.returncode == 0, err.read_text()[-3000:]
    assert_all_gone(logs)


def test_a_process_not_ready_after_its_restart_is_killed_and_restarted_again(tmp_path: Path) -> None:
    """A restart that hangs while starting (stopped at once, before it serves) is not the
    end of the launch: after --timeout it is killed, counted as another end, and started again."""
    proc, logs, err, port = _serve_proxy_only(tmp_path, "--timeout", "15")
    try:
        first = _kill_process(logs, "proxy")
        stuck = _new_pid(logs, "proxy", first, timeout=30, poll=0.02)
        os.kill(stuck, signal.SIGSTOP)  # long before it could serve (a Python start takes ~1 s)
        third = _new_pid(logs, "proxy", stuck, timeout=60)
        _wait_for_text(proc, err, "proxy is ready again", 60)
        out = err.read_text()
        assert "proxy was not ready again 15s after its restart: killing it" in out, out[-3000:]
        assert "restart 2 of at most 3" in out, out[-3000:]
        assert third not in (first, stuck) and proc.poll() is None
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/live", timeout=5) as r:
            assert r.status == 200
    finally:
        _stop_launch(proc, ("--log-dir", str(logs)))
    assert proc.returncode == 0, err.read_text()[-3000:]
    assert_all_gone(logs)


def test_a_restarted_proxy_keeps_admin_changes_and_a_new_launch_starts_from_the_topology(tmp_path: Path) -> None:
    proc, logs, err, port = _serve_proxy_only(tmp_path)
    admin = f"http://127.0.0.1:{port}/admin/instances"
    try:
        urllib.request.urlopen(urllib.request.Request(admin + "/decode-0/drain", method="POST"), timeout=5).close()
        first = _kill_process(logs, "proxy")
        _new_pid(logs, "proxy", first)
        _wait_for_text(proc, err, "proxy is ready again", 60)
        with urllib.request.urlopen(admin, timeout=5) as r:
            assert {i["name"]: i["draining"] for i in json.loads(r.read())["instances"]} == {
                "prefill-0": False, "decode-0": True}
    finally:
        _stop_launch(proc, ("--log-dir", str(logs)))
    assert proc.returncode == 0, err.read_text()[-3000:]
    proc, logs, err, port = _serve_proxy_only(tmp_path)  # the same log directory, a new launch
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/admin/instances", timeout=5) as r:
            assert all(not i["draining"] for i in json.loads(r.read())["instances"])
    finally:
        _stop_launch(proc, ("--log-dir", str(logs)))
    assert_all_gone(logs)


def test_restart_never_stops_the_launch_at_the_first_death(tmp_path: Path) -> None:
    proc, logs, err, _ = _serve_proxy_only(tmp_path, "--restart", "never")
    try:
        _kill_process(logs, "proxy")
        assert proc.wait(60) == 1
    finally:
        _stop_launch(proc, ("--log-dir", str(logs)))
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
    proc = _start_launch(topo, logs, err)
    try:
        _wait_for_text(proc, err, "serving; Ctrl-C stops every process", 700)
        assert (logs / "launch-secret").stat().st_mode & 0o777 == 0o600
        assert json.loads((logs / "launch.json").read_text())["proxy"] == proxy
        for n, name in enumerate(("prefill-0", "decode-0")):
            _new_pid(logs, name, _kill_process(logs, name), timeout=30)
            _wait_for_text(proc, err, f"{name} is ready again", 300)
            _wait_healthy_in_proxy(proxy, 60)  # its next health probe finds the engine back
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
        _stop_launch(proc, ("--log-dir", str(logs)))
    assert proc.returncode == 0, err.read_text()[-3000:]
    assert_all_gone(logs)
    assert not (logs / "launch.json").exists() and not (logs / "launch-secret").exists()


def _wait_healthy_in_proxy(proxy: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with urllib.request.urlopen(proxy + "/admin/instances", timeout=5) as resp:
            instances = json.loads(resp.read())["instances"]
        if all(i["healthy"] for i in instances):
            return
        assert time.monotonic() < deadline, f"the proxy still sees an engine down: {instances}"
        time.sleep(0.5)


def _wait_for_text(proc: subprocess.Popen[bytes], out: Path, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while text not in out.read_text(errors="replace"):
        if proc.poll() is not None:
            raise AssertionError(f"the launch exited with {proc.returncode}:\n{out.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {text!r} within {timeout:g}s:\n{out.read_text()[-3000:]}")
        time.sleep(0.5)


def _stop_launch(proc: subprocess.Popen[bytes], args: tuple[str, ...]) -> None:
    """SIGTERM (the launch stops what it started), then SIGKILL; what its pids.json names
    is killed too when it did not end in time."""
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(90)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
        _kill_recorded(args)


def test_without_a_file_the_built_in_default_is_launched() -> None:
    r = launch("--dry-run", "--platform", "cpu")
    assert r.returncode == 0, r.stderr
    assert re.findall(r"^# (\S+) \(", r.stdout, re.M) == ["prefill-0", "decode-0", "proxy"]
    assert "# topology: built-in cpu-1p1d-tcp" in r.stdout
    copy = ROOT / "pdfabric-logs" / "cpu-1p1d-tcp.yaml"  # launch() runs in ROOT; the default log dir
    assert f"cp {ROOT / 'configs' / 'cpu-1p1d-tcp.yaml'} {copy}" in r.stdout
    assert r.stdout.count(f'"topology":"{copy}"') == 2 and f"proxy --topology {copy}" in r.stdout
    assert "--port 8100" in r.stdout


def test_a_built_in_topology_runs_from_a_copy_in_the_log_directory(tmp_path: Path) -> None:
    """By name: the processes read a copy in the log directory (relative paths of the
    topology land there, not in the installed package); a refused launch copies nothing."""
    logs = tmp_path / "logs"
    with socket.socket() as held:
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            held.bind(("127.0.0.1", 8000))  # the built-in proxy port
        except OSError:
            pytest.skip("port 8000 is in use on this machine: cannot hold it for the refusal check")
        held.listen()
        r = launch("cpu-1p1d-tcp", "--only", "proxy", "--log-dir", str(logs))
    assert r.returncode == 2 and "port 127.0.0.1:8000 (proxy) is not free" in r.stderr, r.stderr
    assert not logs.exists()
    err = tmp_path / "launch.err"
    with open(err, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "pdfabric.cli", "launch", "cpu-1p1d-tcp", "--only", "proxy",
                                 "--log-dir", str(logs)], stdout=f, stderr=subprocess.STDOUT, cwd=tmp_path,
                                env={**os.environ, "COLUMNS": "300"})
    try:
        _wait_for_text(proc, err, "serving; Ctrl-C stops every process", 120)
        copy = logs / "cpu-1p1d-tcp.yaml"
        assert copy.read_bytes() == (ROOT / "configs" / "cpu-1p1d-tcp.yaml").read_bytes()
        assert f"built-in cpu-1p1d-tcp (copied to {copy})" in " ".join(err.read_text().split())
        pid = json.loads((logs / "pids.json").read_text())["proxy"]
        assert str(copy.resolve()) in Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    finally:
        _stop_launch(proc, ("--log-dir", str(logs)))
    assert proc.returncode == 0, err.read_text()[-3000:]
    assert_all_gone(logs)
