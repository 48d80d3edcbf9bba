"""The engines a proxy routes to, and their live load.

An ``Instance`` is one vLLM engine: role (prefill / decode / both), its OpenAI base URL,
and - for a prefill engine - the connector's control endpoint that decode engines dial.
Load counters are updated by the request path (single event loop: no locks).

With a state file (``pdfabric proxy --state-file``), what the admin API changed - instances
added, drained, resumed, removed - is written there after each change, and a proxy
started again with the same file begins from it instead of its topology: a proxy restarted
by its launcher keeps an operator's drain. The file records a digest of the instances the
proxy was started with (``basis_of``); a proxy started with other ones (an edited topology,
other flags) does not use it.
"""

from __future__ import annotations

import hashlib
import json
import os
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

__all__ = ["Instance", "Registry", "UnknownInstance", "basis_of", "host_port_problem", "load_state", "save_state",
           "url_problem"]

Role = Literal["prefill", "decode", "both"]


class UnknownInstance(KeyError):
    pass


@dataclass(eq=False)
class Instance:
    name: str
    role: Role
    url: str  # http://host:port
    control: str | None = None  # host:port of the connector control endpoint (prefill)
    healthy: bool = True
    draining: bool = False
    in_flight: int = 0
    in_flight_tokens: int = 0
    failures: int = 0
    served: int = 0
    last_error: str = ""
    recent: dict[bytes, float] = field(default_factory=dict)  # prefix chunk hash -> last use

    @property
    def can_prefill(self) -> bool:
        return self.role in ("prefill", "both") and self.control is not None

    @property
    def can_decode(self) -> bool:
        return self.role in ("decode", "both")

    @property
    def usable(self) -> bool:
        return self.healthy and not self.draining

    def as_dict(self) -> dict[str, object]:
        return {
            "name": self.name, "role": self.role, "url": self.url, "control": self.control,
            "healthy": self.healthy, "draining": self.draining, "in_flight": self.in_flight,
            "in_flight_tokens": self.in_flight_tokens, "served": self.served, "last_error": self.last_error,
        }


class Registry:
    def __init__(self, instances: list[Instance] | None = None) -> None:
        self._by_name: dict[str, Instance] = {}
        for inst in instances or []:
            self.add(inst)

    def add(self, inst: Instance) -> None:
        if inst.name in self._by_name:
            raise ValueError(f"instance {inst.name!r} already exists")
        self._by_name[inst.name] = inst

    def get(self, name: str) -> Instance:
        try:
            return self._by_name[name]
        except KeyError:
            raise UnknownInstance(name) from None

    def remove(self, name: str) -> Instance:
        return self._by_name.pop(self.get(name).name)

    def all(self) -> list[Instance]:
        return list(self._by_name.values())

    def prefills(self) -> list[Instance]:
        return [i for i in self._by_name.values() if i.can_prefill and i.usable]

    def decodes(self) -> list[Instance]:
        return [i for i in self._by_name.values() if i.can_decode and i.usable]


_STATE_KEYS = ("name", "role", "url", "control", "draining")


def url_problem(url: object) -> str | None:
    """What is wrong with an instance's base URL (None: nothing)."""
    if not isinstance(url, str):
        return f"expected an http://host:port URL, got {url!r}"
    parts = urllib.parse.urlsplit(url)
    try:
        parts.port  # noqa: B018 - raises for a port out of range
    except ValueError:
        return f"expected an http://host:port URL with a port 1-65535, got {url!r}"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"expected an http://host:port URL, got {url!r}"
    return None


def host_port_problem(addr: object) -> str | None:
    """What is wrong with a ``host:port`` (a connector's control endpoint; None: nothing)."""
    host, sep, port = addr.rpartition(":") if isinstance(addr, str) else ("", "", "")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536 or "/" in host:
        return f"expected host:port with a port 1-65535, got {addr!r}"
    return None


def basis_of(instances: list[Instance]) -> str:
    """A digest of the instances a proxy was started with (its topology and flags): a state
    file saved from other ones is not used."""
    rows = sorted((i.name, i.role, i.url, i.control or "") for i in instances)
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]


def save_state(path: Path, registry: Registry, basis: str) -> None:
    """Write the instances as the admin API left them, atomically and durably (a crash or a
    power loss mid-write leaves the previous file)."""
    doc = {"basis": basis, "instances": [{k: getattr(i, k) for k in _STATE_KEYS} for i in registry.all()]}
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(doc, indent=1))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_state(path: Path) -> tuple[str, list[Instance]] | None:
    """(the basis it was saved from, its instances); None when there is no file.
    ``ValueError`` naming the entry when it cannot be used."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        doc = json.loads(text)
    except ValueError as e:
        raise ValueError(f"not JSON ({e})") from None
    entries = doc.get("instances") if isinstance(doc, dict) else None
    if not isinstance(entries, list) or not isinstance(doc.get("basis"), str):
        raise ValueError('expected {"basis": "...", "instances": [...]}')
    out = [_instance_of(e, f"instances[{n}]") for n, e in enumerate(entries)]
    return doc["basis"], out


def _instance_of(e: Any, where: str) -> Instance:
    if not isinstance(e, dict) or set(e) != set(_STATE_KEYS):
        raise ValueError(f"{where}: expected the keys {list(_STATE_KEYS)}")
    if not isinstance(e["name"], str) or not e["name"]:
        raise ValueError(f"{where}.name: expected a non-empty string, got {e['name']!r}")
    if e["role"] not in ("prefill", "decode", "both"):
        raise ValueError(f"{where}.role: expected prefill, decode or both, got {e['role']!r}")
    if (problem := url_problem(e["url"])) is not None:
        raise ValueError(f"{where}.url: {problem}")
    if e["control"] is not None and not isinstance(e["control"], str):
        raise ValueError(f"{where}.control: expected host:port or null, got {e['control']!r}")
    if not isinstance(e["draining"], bool):
        raise ValueError(f"{where}.draining: expected true or false, got {e['draining']!r}")
    return Instance(e["name"], e["role"], e["url"], e["control"], draining=e["draining"])
