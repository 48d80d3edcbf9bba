"""``pdfabric launch``: dry runs of every config, preflight refusals, a failing engine, and
the CPU 1P1D demo end to end - each leaving no process behind (checked by process id)."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from launch_helpers import ROOT, assert_all_gone, launch, stop_launch, wait_for_text, write_topology

from pdfabric.testing.fabric import free_port

pytestmark = [pytest.mark.integration]

CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


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
            wait_for_text(proc, err, "serving; Ctrl-C stops every process", 120)
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
            stop_launch(proc, ("--log-dir", str(logs)))
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
            wait_for_text(proc, err, "serving; Ctrl-C stops every process", 700)
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
            stop_launch(proc, ("--log-dir", str(logs)))
    for name, (proc, logs, err) in procs.items():
        assert proc.returncode == 0, f"{name}: {err.read_text()[-3000:]}"
        assert list(json.loads((logs / "pids.json").read_text())) == [name]
        assert_all_gone(logs)


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
        wait_for_text(proc, err, "serving; Ctrl-C stops every process", 120)
        copy = logs / "cpu-1p1d-tcp.yaml"
        assert copy.read_bytes() == (ROOT / "configs" / "cpu-1p1d-tcp.yaml").read_bytes()
        assert f"built-in cpu-1p1d-tcp (copied to {copy})" in " ".join(err.read_text().split())
        pid = json.loads((logs / "pids.json").read_text())["proxy"]
        assert str(copy.resolve()) in Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    finally:
        stop_launch(proc, ("--log-dir", str(logs)))
    assert proc.returncode == 0, err.read_text()[-3000:]
    assert_all_gone(logs)
