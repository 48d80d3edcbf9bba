"""The topology config plane: models, loader error messages, secrets, ``pdfabric config``."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pdfabric.config import (
    SecretRef,
    TcpTransport,
    Topology,
    load_topology,
    parse_topology,
    resolve_secret,
)
from pdfabric.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))

GOOD = """\
name: test-1p1d
model:
  builtin: tiny-llama
transport:
  kind: tcp
  streams: 4
instances:
  - name: prefill-0
    role: prefill
    port: 8100
    control_port: 8101
    devices: [0]
  - name: decode-0
    role: decode
    port: 8200
    control_port: 8201
    devices: [1]
proxy:
  port: 8000
"""


def config_error(text: str, **kwargs: object) -> str:
    """The message of the ConfigError that ``text`` raises."""
    with pytest.raises(ConfigError) as info:
        parse_topology(text, source="t.yaml", **kwargs)  # type: ignore[arg-type]
    return str(info.value)


# ------------------------------------------------------------------ shipped configs


def test_configs_directory_is_not_empty() -> None:
    assert {p.name for p in CONFIGS} >= {"cpu-1p1d-tcp.yaml", "cpu-1p1d-shm.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_validates(path: Path) -> None:
    topology = load_topology(path)
    assert topology.name == path.stem
    assert topology.source == str(path)
    assert path.read_text().startswith("#"), "each config starts with a comment block"
    assert topology.pairs(), "at least one prefill -> decode pair"


def test_default_config_shape() -> None:
    topology = load_topology(REPO / "configs" / "cpu-1p1d-tcp.yaml")
    assert topology.model.builtin == "tiny-llama" and topology.model.block_size == 32
    assert [(i.name, i.role, i.port, i.control_port, i.devices) for i in topology.instances] == [
        ("prefill-0", "prefill", 8100, 8101, [0]),
        ("decode-0", "decode", 8200, 8201, [1]),
    ]
    assert topology.transport == TcpTransport(streams=2)
    assert topology.proxy.port == 8000
    assert topology.secret is None and topology.shared_secret() is None


# ------------------------------------------------------------------------- the model


def test_defaults_filled_in() -> None:
    topology = parse_topology(GOOD)
    assert topology.version == 1
    assert topology.instances[0].host == "127.0.0.1"
    assert topology.instances[0].tensor_parallel_size == 1
    assert topology.proxy.policy == "round_robin" and topology.proxy.pairing == "concurrent"
    assert topology.proxy.max_body == 8 * 1024 * 1024
    assert topology.cache is None and topology.links == []


def test_models_are_frozen() -> None:
    topology = parse_topology(GOOD)
    with pytest.raises(ValueError):
        topology.name = "other"  # type: ignore[misc]


def test_transport_for_pairs_and_links() -> None:
    text = GOOD.replace("role: prefill", "role: both") + (
        "links:\n  - {prefill: prefill-0, decode: decode-0, transport: {kind: tcp, streams: 4}}\n"
    )
    topology = parse_topology(text)
    assert topology.transport_for("prefill-0", "decode-0") == TcpTransport(streams=4)
    assert topology.transport_for("prefill-0", "prefill-0") == TcpTransport(streams=4)
    with pytest.raises(ConfigError, match="has role decode"):
        topology.transport_for("decode-0", "prefill-0")
    with pytest.raises(ConfigError, match="did you mean 'decode-0'"):
        topology.transport_for("prefill-0", "decode-1")


@pytest.mark.parametrize("override,differs", [("{kind: nixl}", "tcp, got nixl"),
                                              ("{kind: tcp, streams: 8}", "streams: 4, got streams: 8")])
def test_a_link_with_its_own_transport_is_refused(override: str, differs: str) -> None:
    # an engine builds the topology's one transport for all its peers: a pair's own would
    # be shown by `config check` and preflighted, but the KV would go over the default
    text = GOOD + f"links:\n  - {{prefill: prefill-0, decode: decode-0, transport: {override}}}\n"
    lines = config_error(text).splitlines()
    assert lines[0].startswith(f"t.yaml: links[0].transport: expected the topology's transport ({differs}): ")
    assert "a pair cannot have its own" in lines[0] and "top-level 'transport'" in lines[0]


def test_json_dump_round_trips() -> None:
    topology = parse_topology(GOOD + "cache:\n  tiers:\n    - {kind: memory, size: 1GiB}\n")
    dumped = topology.model_dump(mode="json")
    assert dumped["cache"]["tiers"][0] == {"kind": "memory", "size": 1024**3}
    assert parse_topology(json.dumps(dumped)).model_dump(mode="json") == dumped


def test_cache_tiers_parse_sizes() -> None:
    text = GOOD + (
        "cache:\n  chunk_tokens: 256\n  server: {port: 8300}\n  tiers:\n"
        "    - {kind: memory, size: 4GiB}\n"
        "    - {kind: disk, path: /var/cache/pdfabric/kv, size: '20 GB'}\n"
        "    - {kind: s3, bucket: kv, access_key: {env: AK}, secret_key: {env: SK}}\n"
    )
    cache = parse_topology(text).cache
    assert cache is not None
    assert [t.kind for t in cache.tiers] == ["memory", "disk", "s3"]
    assert cache.tiers[0].size == 4 * 1024**3 and cache.tiers[1].size == 20 * 1000**3


# ------------------------------------------------------------------- error messages


def test_malformed_yaml_names_the_line() -> None:
    msg = config_error(GOOD.replace("  port: 8000", "  port: 8000\n bad: [1"))
    assert msg.startswith("t.yaml: invalid YAML at line 20, column 2")


def test_duplicate_yaml_key_is_refused() -> None:
    msg = config_error(GOOD.replace("    port: 8200\n", "    port: 8200\n    port: 8300\n"))
    assert "line 16" in msg and "duplicate key 'port'" in msg


def test_unknown_top_level_key() -> None:
    msg = config_error(GOOD + "proxies: {}\n")
    assert msg.startswith("t.yaml: proxies: unknown key 'proxies'; did you mean 'proxy'?")


def test_unknown_nested_key_names_the_path() -> None:
    msg = config_error(GOOD.replace("    devices: [1]", "    devices: [1]\n    gpus: 2"))
    assert msg.startswith("t.yaml: instances[1].gpus: unknown key 'gpus'")
    msg = config_error(GOOD.replace("streams: 4", "streamz: 4"))
    assert "transport.streamz: unknown key 'streamz'; did you mean 'streams'?" in msg


def test_out_of_range_port() -> None:
    msg = config_error(GOOD.replace("port: 8200", "port: 70000"))
    assert msg == "t.yaml: instances[1].port: expected an integer 1-65535, got 70000 (line 15)"


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("port: 8200", "port: '8200'", "instances[1].port: expected an integer 1-65535, got '8200' (a string: remove the quotes)"),
        ("streams: 4", "streams: yes", "transport.streams: expected an integer 1-64, got true"),
        ("role: decode", "role: 3", "instances[1].role: expected one of 'prefill', 'decode' or 'both', got 3"),
        ("devices: [1]", "devices: 1", "instances[1].devices: expected a list, got 1"),
        ("name: test-1p1d", "name: 5", "name: expected a string, got 5 (quote it)"),
        ("kind: tcp", "kind: tpc", "transport.kind: expected one of 'tcp', 'shm'"),
        ("  kind: tcp\n", "", "transport: missing key 'kind'"),
        ("devices: [0]", "devices: [0, 0]", "instances[0].devices: expected each device once"),
    ],
)
def test_wrong_types_and_values(old: str, new: str, expected: str) -> None:
    assert old in GOOD
    assert expected in config_error(GOOD.replace(old, new))


def test_a_quoted_size_out_of_range_is_not_told_to_drop_the_quotes() -> None:
    from pdfabric.connector.settings import parse_settings

    with pytest.raises(ConfigError) as e:
        parse_settings({"staging_bytes": "0"})
    assert str(e.value).endswith("staging_bytes: expected a size > 0, got '0'")  # "0" is a valid size form


def test_duplicate_ports_name_both_places() -> None:
    msg = config_error(GOOD.replace("control_port: 8201", "control_port: 8100"))
    assert "instances[1].control_port: 8100 is already used by instances[0].port" in msg
    msg = config_error(GOOD.replace("  port: 8000", "  port: 8101"))
    assert "proxy.port: 8101 is already used by instances[0].control_port" in msg


def test_tensor_parallel_ranks_bind_control_ports_that_must_not_collide() -> None:
    tp = GOOD.replace("    control_port: 8101\n    devices: [0]", "    control_port: 8101\n    devices: [0, 1]\n"
                      "    tensor_parallel_size: 2")
    assert "tensor_parallel_size: 2" in tp
    load = parse_topology(tp, source="t.yaml")  # 8101 and 8102 are free
    assert load.instances[0].tensor_parallel_size == 2
    msg = config_error(tp.replace("control_port: 8201", "control_port: 8102"))
    assert "instances[1].control_port: 8102 is already used by instances[0].control_port (+1, tensor-parallel rank 1)" in msg
    msg = config_error(tp.replace("devices: [0, 1]", "devices: [0]"))
    assert "instances[0].devices: tensor_parallel_size 2 needs a device per rank; 1 listed" in msg
    msg = config_error(tp.replace("control_port: 8101", "control_port: 65535"))
    assert "instances[0].control_port (+1, tensor-parallel rank 1): comes to 65536, past the last port 65535" in msg


def test_a_derived_cache_http_port_past_65535_is_refused() -> None:
    msg = config_error(GOOD + "cache:\n  server: {port: 65535}\n  tiers: [{kind: memory, size: 1GiB}]\n")
    assert "cache.server.http_port (port + 1): comes to 65536, past the last port 65535" in msg


def test_wildcard_host_collides_with_loopback() -> None:
    msg = config_error(GOOD.replace("  port: 8000", "  host: 0.0.0.0\n  port: 8200"))
    assert "proxy.port: 8200 is already used by instances[1].port" in msg


def test_same_port_on_different_hosts_is_fine() -> None:
    parse_topology(GOOD.replace("    port: 8200", "    host: 10.0.0.2\n    port: 8100"))


def test_duplicate_instance_names() -> None:
    msg = config_error(GOOD.replace("name: decode-0", "name: prefill-0"))
    assert "instances[1].name: 'prefill-0' is already the name of instances[0]" in msg


@pytest.mark.parametrize("name", ["proxy", "cache-server"])
def test_the_launchers_process_names_are_not_instance_names(name: str) -> None:
    msg = config_error(GOOD.replace("name: decode-0", f"name: {name}"))
    assert f"instances[1].name: {name!r} names the launcher's {name} process; choose another instance name" in msg


def test_a_broken_pipe_that_is_not_our_output_is_not_hidden(monkeypatch: pytest.MonkeyPatch) -> None:
    from pdfabric import cli
    from pdfabric.commands import config as command

    def lost_socket(args: object) -> int:
        raise BrokenPipeError(32, "Broken pipe")  # e.g. an HTTP peer that went away mid-send

    monkeypatch.setattr(command, "run_list", lost_socket)
    with pytest.raises(BrokenPipeError):
        cli.main(["config", "list"])


def test_roles_must_cover_prefill_and_decode() -> None:
    msg = config_error(GOOD.replace("role: decode", "role: prefill"))
    assert "instances: no instance can decode" in msg


def test_link_to_unknown_or_wrong_role_instance() -> None:
    links = (
        "links:\n"
        "  - {prefill: prefill-1, decode: decode-0, transport: {kind: shm}}\n"
        "  - {prefill: prefill-0, decode: prefill-0, transport: {kind: shm}}\n"
    )
    lines = config_error(GOOD + links).splitlines()
    assert lines[0].startswith("t.yaml: links[0].prefill: no instance named 'prefill-1'; did you mean 'prefill-0'?")
    assert lines[1].startswith("t.yaml: links[1].decode: expected an instance with role decode or both")


def test_same_host_transport_across_hosts() -> None:
    text = GOOD.replace("kind: tcp\n  streams: 4", "kind: shm").replace(
        "    port: 8200", "    host: 10.0.0.2\n    port: 8200"
    )
    assert "transport: shm works only between instances on one host" in config_error(text)
    assert "links entry" not in config_error(text)  # a link cannot change the transport: not suggested
    # a link naming that same transport is checked as well (the default's check skips its pair)
    linked = text + "links:\n  - {prefill: prefill-0, decode: decode-0, transport: {kind: shm}}\n"
    assert "links[0].transport: shm works only between instances on one host" in config_error(linked)


def test_cache_tier_order_and_uniqueness() -> None:
    text = GOOD + (
        "cache:\n  tiers:\n"
        "    - {kind: disk, path: /var/cache/pdfabric/kv, size: 1GiB}\n"
        "    - {kind: memory, size: 1GiB}\n"
        "    - {kind: memory, size: 2GiB}\n"
    )
    lines = config_error(text).splitlines()
    assert "cache.tiers[1]: a memory tier must come before disk" in lines[0]
    assert "cache.tiers[2]: a second memory tier" in lines[1]


def test_bad_size_string() -> None:
    msg = config_error(GOOD + "cache:\n  tiers:\n    - {kind: memory, size: 4 gigs}\n")
    assert "cache.tiers[0].size: expected a size like '4GiB'" in msg and "got '4 gigs'" in msg


def test_engine_args_cannot_override_the_topology() -> None:
    msg = config_error(GOOD.replace("devices: [1]", "devices: [1]\n    engine_args: {port: 9000}"))
    assert "instances[1].engine_args: 'port' is set by the topology" in msg
    msg = config_error(GOOD.replace("devices: [1]", "devices: [1]\n    engine_args: {--max-num-seqs: 4}"))
    assert "without leading dashes" in msg


def test_several_errors_one_per_line() -> None:
    text = GOOD.replace("port: 8200", "port: 0").replace("streams: 4", "streams: 99") + "extra: 1\n"
    lines = config_error(text).splitlines()
    assert len(lines) == 3
    assert all(line.startswith("t.yaml: ") for line in lines)
    assert {line.split(": ")[1] for line in lines} == {"transport.streams", "instances[1].port", "extra"}


@pytest.mark.parametrize(
    ("text", "expected"),
    [("", "the file is empty"), ("# only a comment\n", "the file is empty"), ("- a\n- b\n", "got a list")],
)
def test_empty_or_non_mapping_file(text: str, expected: str) -> None:
    assert expected in config_error(text)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_topology(tmp_path / "nope.yaml")


# --------------------------------------------------------------------------- secrets


@pytest.mark.parametrize("inline", ["hunter2", "{value: hunter2}", "[a]"])
def test_inline_secret_is_refused(inline: str) -> None:
    msg = config_error(GOOD + f"secret: {inline}\n")
    assert msg.startswith("t.yaml: secret: ")
    assert "{env: VAR_NAME} or {file: path/to/secret}" in msg


def test_secret_ref_needs_exactly_one_source() -> None:
    assert "got both" in config_error(GOOD + "secret: {env: A, file: b}\n")
    assert "got neither" in config_error(GOOD + "secret: {}\n")


def test_missing_secret_file_reported_at_check_time(tmp_path: Path) -> None:
    path = tmp_path / "topo.yaml"
    path.write_text(GOOD + "secret: {file: hmac.key}\n")
    topology = load_topology(path)  # references are not read while loading
    with pytest.raises(ConfigError) as info:
        load_topology(path, check_secrets=True)
    line = (GOOD + "secret: {file: hmac.key}\n").splitlines().index("secret: {file: hmac.key}") + 1
    assert str(info.value) == f"{path}: secret: secret file {tmp_path / 'hmac.key'} does not exist (line {line})"
    assert info.value.path == "secret"
    (tmp_path / "hmac.key").write_text("s3cret\n")
    load_topology(path, check_secrets=True)
    assert topology.shared_secret() == "s3cret"


def test_env_secret_resolved_at_use_time(monkeypatch: pytest.MonkeyPatch) -> None:
    text = GOOD + "cache:\n  tiers:\n    - {kind: redis, url: 'redis://h:6379', password: {env: PDF_TEST_PW}}\n"
    monkeypatch.delenv("PDF_TEST_PW", raising=False)
    topology = parse_topology(text, source="t.yaml")
    [(path, ref)] = topology.secret_refs()
    assert path == "cache.tiers[0].password"
    with pytest.raises(ConfigError, match=r"^t.yaml: cache.tiers\[0\].password: environment variable PDF_TEST_PW is not set"):
        topology.check_secrets()
    monkeypatch.setenv("PDF_TEST_PW", "pw")
    assert resolve_secret(ref) == "pw"
    topology.check_secrets()


def test_password_inside_redis_url_is_refused() -> None:
    msg = config_error(GOOD + "cache:\n  tiers:\n    - {kind: redis, url: 'redis://:pw@h:6379'}\n")
    assert "cache.tiers[0].url: the URL holds a password" in msg


def test_secret_ref_python_construction() -> None:
    assert SecretRef(env="X").describe() == "env X"
    assert Topology.model_fields["secret"].default is None


# ------------------------------------------------------------------------------- CLI


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """``pdfabric ARGS`` in a subprocess (config only, until the bench command exists)."""
    if importlib.util.find_spec("pdfabric.commands.bench") is not None:
        cmd = [sys.executable, "-m", "pdfabric.cli", *args]
    else:
        main = "import sys; from pdfabric import cli; cli.COMMANDS = ('config',); sys.exit(cli.main())"
        cmd = [sys.executable, "-c", main, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=REPO, check=False)


def test_cli_check_good_file() -> None:
    result = run_cli("config", "check", "configs/cpu-1p1d-tcp.yaml")
    assert result.returncode == 0, result.stderr
    assert "prefill-0" in result.stdout and "decode-0" in result.stdout
    assert result.stderr == ""


def test_cli_check_bad_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(GOOD.replace("port: 8200", "port: 70000") + "secret: inline\n")
    result = run_cli("config", "check", str(bad))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 2
    assert f"error: {bad}: instances[1].port: expected an integer 1-65535, got 70000 (line 15)" in lines
    assert any(line.startswith(f"error: {bad}: secret: ") for line in lines)


def test_cli_show_json(tmp_path: Path) -> None:
    result = run_cli("config", "show", "configs/cpu-1p1d-shm.yaml", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["transport"] == {"kind": "shm", "transfer_timeout_s": 30.0, "streams": 2, "connect_timeout_s": 5.0}
    assert data["proxy"]["max_body"] == 8 * 1024 * 1024


def test_cli_functions_directly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    from pdfabric.commands import config as command

    parser = argparse.ArgumentParser(prog="pdfabric")
    command.register(parser.add_subparsers())
    missing = parser.parse_args(["config", "check", str(tmp_path / "nope.yaml")])
    assert missing.func(missing) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'nope.yaml'}: no such file\n"
    show = parser.parse_args(["config", "show", str(REPO / "configs" / "cpu-1p1d-tcp.yaml")])
    assert show.func(show) == 0
    assert "streams: 2" in capsys.readouterr().out


def test_cli_built_in_topologies_by_name(tmp_path: Path) -> None:
    """Every file in configs/ is a built-in topology: listed, and taken by name where a
    FILE is (from any directory: a wheel installs them inside the package)."""
    names = sorted(p.stem for p in (REPO / "configs").glob("*.yaml"))
    listed = run_cli("config", "list")
    assert listed.returncode == 0, listed.stderr
    assert [line.split()[0] for line in listed.stdout.splitlines()] == names
    assert "cpu-1p1d-tcp" in next(line for line in listed.stdout.splitlines() if "default of pdfabric launch" in line)
    shown = subprocess.run([sys.executable, "-m", "pdfabric.cli", "config", "show", "cpu-1p1d-shm.yaml", "--json"],
                           capture_output=True, text=True, timeout=60, cwd=tmp_path, check=False)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["transport"]["kind"] == "shm"
    own = tmp_path / "cpu-1p1d-shm"  # a file of that name here wins over the built-in
    own.write_text(GOOD)
    mine = subprocess.run([sys.executable, "-m", "pdfabric.cli", "config", "show", "cpu-1p1d-shm", "--json"],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path, check=False)
    assert mine.returncode == 0 and json.loads(mine.stdout)["name"] != "cpu-1p1d-shm", mine.stderr
    bad = run_cli("config", "check", "cpu-1p1d-tpc")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.startswith("error: cpu-1p1d-tpc: no such file, and no built-in topology of that name (built in: "
                                 + ", ".join(names) + ")")


def test_cli_output_into_a_pipe_whose_reader_left_ends_quietly() -> None:
    """``pdfabric config show X | head -1``: no traceback when the reader has gone."""
    proc = subprocess.Popen([sys.executable, "-m", "pdfabric.cli", "config", "show", "cpu-1p1d-cache"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # before the command writes: its first flush meets a closed pipe
    with proc.stderr:
        err = proc.stderr.read().decode()
    assert proc.wait(60) == 141, err
    assert "Traceback" not in err and "BrokenPipeError" not in err, err


def test_cli_check_says_when_only_secrets_fail() -> None:
    """A shipped topology whose secret lives in an unset variable: the error names it, and
    a note says the rest is valid and how to check it without secrets."""
    env = {k: v for k, v in os.environ.items() if k != "PDFABRIC_SECRET"}
    r = subprocess.run([sys.executable, "-m", "pdfabric.cli", "config", "check", str(REPO / "configs" / "gpu-2p2d-nixl.yaml")],
                       capture_output=True, text=True, timeout=60, env=env, check=False)
    assert r.returncode == 2 and "PDFABRIC_SECRET is not set" in r.stderr
    assert "note: everything else is valid; only secret references do not resolve here" in r.stderr
    assert "--skip-secrets" in r.stderr
    broken = subprocess.run([sys.executable, "-m", "pdfabric.cli", "config", "check", "cpu-1p1d-tpc"],
                            capture_output=True, text=True, timeout=60, env=env, check=False)
    assert broken.returncode == 2 and "note:" not in broken.stderr and "Traceback" not in broken.stderr


def test_config_show_fills_the_defaults_that_follow_from_other_fields(tmp_path: Path) -> None:
    """``served_name`` (the builtin name) and the cache server's ``http_port`` (port + 1) as
    the programs use them; the output loads back as the same topology."""
    shown = run_cli("config", "show", "cpu-1p1d-cache")
    assert shown.returncode == 0, shown.stderr
    doc = yaml.safe_load(shown.stdout)
    assert doc["model"]["served_name"] == "tiny-llama"
    assert doc["cache"]["server"]["http_port"] == doc["cache"]["server"]["port"] + 1
    copy = tmp_path / "copy.yaml"
    copy.write_text(shown.stdout)
    again = run_cli("config", "show", str(copy))
    assert again.returncode == 0 and yaml.safe_load(again.stdout)["instances"] == doc["instances"], again.stderr


def test_cache_server_refuses_a_built_in_topology_name_saying_how_to_run_it() -> None:
    r = run_cli("cache-server", "--topology", "cpu-1p1d-cache")
    assert r.returncode == 2 and "is a built-in topology: run it with `pdfabric launch cpu-1p1d-cache`" in r.stderr
    assert "pdfabric config show cpu-1p1d-cache > FILE" in r.stderr
