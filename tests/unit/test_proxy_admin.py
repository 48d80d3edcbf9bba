"""The proxy's admin API edges that need no engine: who may use it, and what an added
instance must look like."""

from __future__ import annotations

import asyncio
from typing import Any
from unittest import mock

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from pdfabric.proxy.instances import Registry
from pdfabric.proxy.server import HTTPProblem, Proxy, ProxySettings, _loopback, _new_instance


@pytest.mark.parametrize(("remote", "local"), [
    ("127.0.0.1", True), ("127.3.4.5", True), ("::1", True), ("::ffff:127.0.0.1", True), (None, False), ("", False),
    ("10.1.2.3", False), ("192.168.0.9", False), ("::ffff:10.0.0.1", False), ("fe80::1%eth0", False),
    ("2001:db8::1", False), ("not-an-address", False),
])
def test_loopback_clients(remote: str | None, local: bool) -> None:
    assert _loopback(remote) is local


def _request(path: str, remote: str, headers: dict[str, str] | None = None, method: str = "POST") -> web.Request:
    transport = mock.Mock()
    transport.get_extra_info.side_effect = lambda name, default=None: (remote, 40000) if name == "peername" else default
    return make_mocked_request(method, path, headers=headers or {}, transport=transport)


def _call(proxy: Proxy, request: web.Request) -> web.StreamResponse:
    async def handler(_: web.Request) -> web.Response:
        return web.json_response({"reached": True})

    return asyncio.run(proxy._errors(request, handler))


def test_without_api_keys_the_admin_api_answers_only_this_host() -> None:
    proxy = Proxy(ProxySettings(host="0.0.0.0"), Registry())
    far = _call(proxy, _request("/admin/instances/d0/drain", "10.1.2.3"))
    assert far.status == 403 and b"not over loopback (127.0.0.1 or ::1)" in far.body  # type: ignore[attr-defined]
    assert _call(proxy, _request("/admin/instances", "10.1.2.3", method="DELETE")).status == 403
    assert _call(proxy, _request("/admin/instances", "10.1.2.3", method="GET")).status == 200  # listing: status
    assert _call(proxy, _request("/admin/instances/d0/drain", "127.0.0.1")).status == 200
    assert _call(proxy, _request("/v1/completions", "10.1.2.3")).status == 200  # serving is not admin
    # a web page in a browser on this host: its cross-site POST reaches loopback too
    for headers in ({"Origin": "http://example.com"}, {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors"}):
        page = _call(proxy, _request("/admin/instances", "127.0.0.1", headers))
        assert page.status == 403 and b"from a web browser" in page.body  # type: ignore[attr-defined]


def test_with_api_keys_a_remote_admin_needs_the_key() -> None:
    proxy = Proxy(ProxySettings(host="0.0.0.0", api_keys=("k1",)), Registry())
    assert _call(proxy, _request("/admin/instances", "10.1.2.3")).status == 401
    ok = _call(proxy, _request("/admin/instances", "10.1.2.3", {"Authorization": "Bearer k1"}))
    assert ok.status == 200


GOOD: dict[str, Any] = {"name": "d-1.x", "role": "decode", "url": "http://10.0.0.2:8200/"}


@pytest.mark.parametrize(("change", "expected"), [
    ({"name": "D 2"}, "name: expected letters, digits"),
    ({"name": ""}, "name: expected letters"),
    ({"name": None}, "name: expected letters"),
    ({"role": "decoder"}, "role: expected prefill, decode or both, got 'decoder'"),
    ({"url": "http://h:99999"}, "url: expected an http://host:port URL with a port 1-65535"),
    ({"url": "h:1"}, "url: expected an http://host:port URL, got 'h:1'"),
    ({"url": 5}, "url: expected an http://host:port URL, got 5"),
    ({"role": "prefill"}, "control: a prefill instance needs its connector's control endpoint"),
    ({"role": "prefill", "control": "garbage"}, "control: expected host:port with a port 1-65535, got 'garbage'"),
    ({"control": "h:0"}, "control: expected host:port"),
    ({"weight": 2}, "unknown field(s) ['weight']"),
])
def test_an_added_instance_names_the_field_that_is_wrong(change: dict[str, Any], expected: str) -> None:
    with pytest.raises(HTTPProblem) as e:
        _new_instance({**GOOD, **change})
    assert e.value.status == 400 and expected in e.value.message


def test_a_good_instance_is_taken_as_given() -> None:
    inst = _new_instance({**GOOD, "role": "prefill", "control": "10.0.0.2:8201"})
    assert (inst.name, inst.role, inst.url, inst.control) == ("d-1.x", "prefill", "http://10.0.0.2:8200", "10.0.0.2:8201")
    assert not inst.healthy and inst.last_error == "not checked yet"  # no request goes to it before its check
