"""The engines a proxy routes to, and their live load.

An ``Instance`` is one vLLM engine: role (prefill / decode / both), its OpenAI base URL,
and - for a prefill engine - the connector's control endpoint that decode engines dial.
Load counters are updated by the request path (single event loop: no locks).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

__all__ = ["Instance", "Registry", "UnknownInstance"]

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
