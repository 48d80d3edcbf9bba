"""``resolve_settings``: the connector's ``kv_connector_extra_config``, strict and resolved."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pdfabric.config import TcpTransport
from pdfabric.connector.settings import SOURCE, resolve_settings
from pdfabric.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
TOPOLOGY = str(REPO / "configs" / "cpu-1p1d-tcp.yaml")
ENV = "PDFABRIC_TEST_CONNECTOR_SECRET"


def refused(extra: Any, *, needs_control_port: bool = False) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        resolve_settings(extra, needs_control_port=needs_control_port)
    assert info.value.source == SOURCE or info.value.path is None
    return info.value


@pytest.mark.parametrize("extra", [None, {}])
def test_defaults(extra: Any) -> None:
    r = resolve_settings(extra, needs_control_port=False)
    assert r.transport == TcpTransport()
    assert (r.control_host, r.control_port, r.advertise_host) == ("127.0.0.1", None, "127.0.0.1")
    assert (r.secret, r.secret_source) == (b"", "none")
    assert (r.transfer_timeout_s, r.lease_s, r.grant_wait_s, r.heartbeat_s) == (30.0, 30.0, 30.0, 2.0)
    assert r.log_transfers == "debug"


def test_inline_settings() -> None:
    r = resolve_settings(
        {"transport": {"kind": "tcp", "streams": 4}, "control_host": "0.0.0.0", "control_port": 9101,
         "advertise_host": "10.0.0.5", "lease_s": 5, "engine_name": "prefill-a"},
        needs_control_port=True,
    )
    assert r.transport == TcpTransport(streams=4)
    assert (r.control_host, r.control_port, r.advertise_host) == ("0.0.0.0", 9101, "10.0.0.5")
    assert r.lease_s == 5.0 and r.engine_name == "prefill-a"


def test_advertise_host_defaults_to_control_host() -> None:
    r = resolve_settings({"control_host": "10.1.2.3", "control_port": 9101}, needs_control_port=True)
    assert r.advertise_host == "10.1.2.3"


def test_unknown_key_is_refused_with_path_and_suggestion() -> None:
    err = refused({"contol_port": 8101})
    assert err.path == "contol_port"
    assert f"{SOURCE}: contol_port:" in str(err)
    assert "did you mean 'control_port'" in str(err)


def test_unknown_key_without_close_match_lists_the_keys() -> None:
    err = refused({"zzz": 1})
    assert err.path == "zzz" and "control_port" in str(err)


@pytest.mark.parametrize(
    "extra, path",
    [({"control_port": 70000}, "control_port"), ({"lease_s": -1}, "lease_s"),
     ({"transport": {"kind": "tpc"}}, "transport.kind"), ({"log_transfers": "warn"}, "log_transfers"),
     ({"secret": "inline-value"}, "secret")],
)
def test_bad_values_are_refused_with_path(extra: dict[str, Any], path: str) -> None:
    assert refused(extra).path == path


def test_producer_without_control_port_is_refused() -> None:
    err = refused({}, needs_control_port=True)
    assert err.path == "control_port" and "control_port" in err.message


def test_consumer_without_control_port_is_fine() -> None:
    assert resolve_settings({}, needs_control_port=False).control_port is None


def test_topology_reference_gives_instance_endpoint_and_transport() -> None:
    r = resolve_settings({"topology": TOPOLOGY, "instance": "prefill-0", "lease_s": 7}, needs_control_port=True)
    assert r.control_port == 8101 and r.control_host == "127.0.0.1"
    assert r.transport == TcpTransport(streams=2, connect_timeout_s=5, transfer_timeout_s=30)
    assert r.lease_s == 7.0  # timing keys may accompany a topology
    assert (r.secret, r.secret_source) == (b"", "none")
    d = resolve_settings({"topology": TOPOLOGY, "instance": "decode-0"}, needs_control_port=False)
    assert d.control_port == 8201


@pytest.mark.parametrize(
    "key, value",
    [("transport", {"kind": "tcp"}), ("control_port", 9000), ("control_host", "127.0.0.1")],
)
def test_topology_plus_inline_endpoint_is_refused(key: str, value: Any) -> None:
    err = refused({"topology": TOPOLOGY, "instance": "prefill-0", key: value})
    assert err.path == key and "topology" in err.message


def test_secret_beside_a_topology_without_one_is_the_launch_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, "per-launch")
    r = resolve_settings({"topology": TOPOLOGY, "instance": "prefill-0", "secret": {"env": ENV}}, needs_control_port=True)
    assert r.secret == b"per-launch"


def test_unknown_instance_is_refused_listing_the_names() -> None:
    err = refused({"topology": TOPOLOGY, "instance": "prefill-9"})
    assert err.path == "instance"
    assert "prefill-9" in err.message and "prefill-0" in err.message and "decode-0" in err.message


def test_topology_without_instance_is_refused() -> None:
    assert refused({"topology": TOPOLOGY}).path == "instance"


def test_instance_without_topology_is_refused() -> None:
    assert refused({"instance": "prefill-0"}).path == "instance"


def test_missing_topology_file_is_refused(tmp_path: Path) -> None:
    err = refused({"topology": str(tmp_path / "absent.yaml"), "instance": "prefill-0"})
    assert "no such file" in str(err)


def test_topology_secret_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    topo = tmp_path / "t.yaml"
    topo.write_text(Path(TOPOLOGY).read_text(encoding="utf-8") + f"\nsecret:\n  env: {ENV}\n", encoding="utf-8")
    monkeypatch.setenv(ENV, "topo-secret")
    r = resolve_settings({"topology": str(topo), "instance": "prefill-0"}, needs_control_port=True)
    assert r.secret == b"topo-secret"
    assert str(topo) in r.secret_source and "topo-secret" not in r.secret_source


def test_inline_env_secret_is_read_into_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, "  hunter2\n")
    r = resolve_settings({"secret": {"env": ENV}}, needs_control_port=False)
    assert r.secret == b"hunter2"
    assert r.secret_source == f"env {ENV}"


def test_missing_env_secret_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV, raising=False)
    err = refused({"secret": {"env": ENV}})
    assert err.path == "secret" and ENV in err.message


def test_secret_file_relative_to_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "hmac.key").write_text("from-file\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    r = resolve_settings({"secret": {"file": "hmac.key"}}, needs_control_port=False)
    assert r.secret == b"from-file" and r.secret_source == "file hmac.key"


def test_secret_in_both_places_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    topo = tmp_path / "t.yaml"
    topo.write_text(Path(TOPOLOGY).read_text(encoding="utf-8") + f"\nsecret:\n  env: {ENV}\n", encoding="utf-8")
    monkeypatch.setenv(ENV, "topo-secret")
    err = refused({"topology": str(topo), "instance": "prefill-0", "secret": {"env": ENV}})
    assert err.path == "secret" and "both" in err.message


def test_topology_cache_takes_local_tokens_from_the_proxy(tmp_path: Path) -> None:
    text = (REPO / "configs" / "cpu-1p1d-cache.yaml").read_text()
    topo = tmp_path / "t.yaml"
    topo.write_text(text.replace("  cache_lookup: true", "  cache_lookup: true\n  cache_local_tokens: 96"))
    r = resolve_settings({"topology": str(topo), "instance": "decode-0"}, needs_control_port=False)
    assert r.cache is not None and r.cache.local_compute_tokens == 96 and r.cache.chunk_tokens == 64
    assert r.cache.server == "127.0.0.1:8300"
    inline = resolve_settings({"topology": str(topo), "instance": "decode-0", "cache": {"local_compute_tokens": 0}},
                              needs_control_port=False)
    assert inline.cache is not None and inline.cache.local_compute_tokens == 0  # an inline value wins
    default = resolve_settings({"topology": str(REPO / "configs" / "cpu-1p1d-cache.yaml"), "instance": "decode-0"},
                               needs_control_port=False)
    assert default.cache is not None and default.cache.local_compute_tokens == 256
