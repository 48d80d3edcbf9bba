"""The transport registry (names -> classes, install hints) and the error tree's context."""

from __future__ import annotations

import sys

import pytest

import pdfabric.transports as transports
from pdfabric.errors import (
    ConfigError,
    ConnectError,
    FabricError,
    GrantRefused,
    PeerGone,
    ProtocolMismatch,
    StalePeer,
    TransferTimeout,
    TransportError,
    TransportUnavailable,
)
from pdfabric.transports.base import Transport
from pdfabric.transports.registry import TRANSPORTS, local_host_id

BUILTIN = ("tcp", "shm", "loopback")


# ------------------------------------------------------------------ registry


def test_create_unknown_transport_names_the_known_ones() -> None:
    with pytest.raises(TransportUnavailable) as info:
        transports.create("nope")
    msg = str(info.value)
    assert "'nope'" in msg
    for name in TRANSPORTS:
        assert name in msg
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_transport_class_unknown_is_transport_unavailable() -> None:
    with pytest.raises(TransportUnavailable, match="unknown transport 'Tcp'"):
        transports.transport_class("Tcp")  # names are exact


def test_transport_not_built_yet_says_so(monkeypatch) -> None:
    monkeypatch.setitem(TRANSPORTS, "future", ("pdfabric.transports.future", "FutureTransport", ""))
    with pytest.raises(TransportUnavailable) as info:
        transports.transport_class("future")
    err = info.value
    assert "'future' is not implemented" in err.message
    assert err.transport == "future" and "transport=future" in str(err)
    assert isinstance(err.__cause__, ImportError)
    assert err.status_hint == 503


def test_missing_optional_dependency_says_how_to_install_it(tmp_path, monkeypatch) -> None:
    (tmp_path / "fake_backend_mod.py").write_text("import definitely_not_installed_pkg\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(TRANSPORTS, "fakeback", ("fake_backend_mod", "X", "pip install 'pdfabric[fake]'"))
    with pytest.raises(TransportUnavailable) as info:
        transports.transport_class("fakeback")
    err = info.value
    assert "pip install 'pdfabric[fake]'" in err.message
    assert "'fakeback' is not available" in err.message and "definitely_not_installed_pkg" in err.message
    assert isinstance(err.__cause__, ImportError)


@pytest.mark.parametrize("name", BUILTIN)
def test_builtin_transports_load_as_transport_classes(name: str) -> None:
    cls = transports.transport_class(name)
    assert issubclass(cls, Transport)
    assert cls.name == name


def test_available_maps_builtins_to_empty_and_others_to_a_reason() -> None:
    avail = transports.available()
    assert set(avail) == set(TRANSPORTS)
    for name in BUILTIN:
        assert avail[name] == "", f"{name}: {avail[name]}"
    for name, (module, _, hint) in TRANSPORTS.items():
        if avail[name]:
            # a module that imports everywhere gives its own reason (cuda_ipc: no CUDA device)
            own = getattr(sys.modules.get(module), "unavailable_reason", lambda: "")()
            assert "not implemented" in avail[name] or (hint and hint in avail[name]) or (own and own in avail[name]), (
                name, avail[name])  # fmt: skip


def test_local_host_id_is_stable_and_names_the_host() -> None:
    import socket

    first = local_host_id()
    assert first == local_host_id()
    local_host_id.cache_clear()
    assert local_host_id() == first  # same machine, same boot: same id when recomputed
    host, _, boot = first.rpartition("/")
    assert host == socket.gethostname() and boot


# ------------------------------------------------------------------ errors


def test_error_str_carries_its_context() -> None:
    err = PeerGone("connection lost", transport="tcp", peer="10.0.0.2:9000", transfer_id="req-7", request_id="r-1")
    assert str(err) == "connection lost [transport=tcp, peer=10.0.0.2:9000, transfer=req-7, request=r-1]"
    assert err.message == "connection lost"
    assert (err.transport, err.peer, err.transfer_id, err.request_id) == ("tcp", "10.0.0.2:9000", "req-7", "r-1")


def test_error_str_lists_only_the_context_it_has() -> None:
    assert str(GrantRefused("refused", peer="p")) == "refused [peer=p]"
    assert str(GrantRefused("refused", transfer_id="t", transport="shm")) == "refused [transport=shm, transfer=t]"
    assert str(FabricError("plain")) == "plain"


def test_transfer_timeout_is_also_a_timeout_error() -> None:
    err = TransferTimeout("slow", transfer_id="t")
    assert isinstance(err, TimeoutError) and isinstance(err, TransportError) and isinstance(err, FabricError)
    with pytest.raises(TimeoutError):
        raise err
    assert err.status_hint == 504


def test_config_error_prefixes_source_and_path() -> None:
    err = ConfigError("expected int, got str", path="instances[1].port", source="topo.yaml")
    assert str(err) == "topo.yaml: instances[1].port: expected int, got str"
    assert err.path == "instances[1].port" and err.source == "topo.yaml"
    assert str(ConfigError("bad", path="proxy.port")) == "proxy.port: bad"
    assert str(ConfigError("bad", source="t.yaml")) == "t.yaml: bad"
    assert str(ConfigError("bad")) == "bad"
    assert err.status_hint == 400


def test_error_tree_branches() -> None:
    assert issubclass(StalePeer, ConnectError) and issubclass(ConnectError, TransportError)
    assert issubclass(TransportUnavailable, TransportError)
    assert issubclass(ProtocolMismatch, FabricError) and not issubclass(ProtocolMismatch, TransportError)
    assert issubclass(ConfigError, FabricError) and not issubclass(ConfigError, TransportError)
    assert not issubclass(TransportError, TimeoutError)
