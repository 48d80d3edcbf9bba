"""The connector's own settings: ``kv_connector_extra_config`` of vLLM's
``--kv-transfer-config``, validated strictly (unknown keys refused).

Either inline::

    {"transport": {"kind": "tcp", "streams": 2}, "control_port": 8101,
     "secret": {"env": "PDFABRIC_SECRET"}}

or by reference to a topology file, which then supplies the transport, the control
endpoint of the named instance and the shared secret::

    {"topology": "configs/cpu-1p1d-tcp.yaml", "instance": "prefill-0"}

Inline timing keys (``transfer_timeout_s``, ``lease_s`` ...) may accompany a topology
reference; transport and control endpoint may not (one source of truth), and a ``secret``
only when the topology names none (the launcher's per-launch secret).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pdfabric.config.checks import problems_error
from pdfabric.config.loader import load_topology, validation_problems
from pdfabric.config.models import (
    CacheConfig,
    CacheTier,
    Host,
    Port,
    PositiveSize,
    Seconds,
    TcpTransport,
    TransportConfig,
)
from pdfabric.config.secrets import SecretRef, resolve_secret
from pdfabric.errors import ConfigError

__all__ = ["CacheSettings", "ConnectorSettings", "Faults", "Resolved", "resolve_settings", "SOURCE"]

SOURCE = "kv_connector_extra_config"
_TOPOLOGY_OWNS = ("transport", "control_host", "control_port")


class Faults(BaseModel):
    """Fault injection for tests and drills, by transfer-id prefix; never set in production.

    - ``corrupt_prefix`` (consumer): overwrite the received blocks with noise before
      reporting them, so a test can prove the decode output depends on the pushed bytes;
    - ``drop_prefix`` (producer): report the push done without sending a byte (the
      consumer then times out);
    - ``delay_prefix`` / ``delay_s`` (producer): push ``delay_s`` late (late writes).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    corrupt_prefix: str | None = None
    drop_prefix: str | None = None
    delay_prefix: str | None = None
    delay_s: Seconds = 1.0

    def hit(self, prefix: str | None, tid: str) -> bool:
        return bool(prefix) and tid.startswith(prefix)  # type: ignore[arg-type]


class CacheSettings(BaseModel):
    """The shared KV cache from the connector's side: a cache server (``server: host:port``)
    or tiers in this engine's process (``tiers``, single-engine set-ups); exactly one.

    - ``chunk_tokens``: tokens per cached chunk (a multiple of the block size; every engine
      sharing a cache must use the same);
    - ``salt``: tenant salt mixed into every key (engines with different salts share nothing);
    - ``store``: store computed prompts and finished sequences (``False``: look up only);
    - ``timeout_s``: the longest a cache call may take before it counts as a miss;
    - ``local_compute_tokens``: a decode request whose prompt is cached but for at most this
      many tokens computes them itself instead of waiting for the producer's push (which is
      cancelled); 0 waits for the producer unless the cache holds every prompt token.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    server: Annotated[str, Field(pattern=r"^(\[[0-9a-fA-F:.]+\]|[^\s:/\[\]]+):[0-9]{1,5}$")] | None = None
    tiers: list[CacheTier] | None = None
    chunk_tokens: Annotated[int, Field(gt=0)] = 256
    salt: str | None = None
    store: bool = True
    timeout_s: Seconds = 0.5
    local_compute_tokens: Annotated[int, Field(ge=0)] = 256

    def check(self) -> None:
        if (self.server is None) == (self.tiers is None):
            raise ConfigError("give either 'server' (host:port of a pdfabric cache-server) or 'tiers' "
                              "(a cache in this engine's process), not both and not neither",
                              path="cache", source=SOURCE)


class ConnectorSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    topology: str | None = None
    instance: str | None = None
    transport: TransportConfig | None = None
    control_host: Host | None = None
    control_port: Port | None = None
    advertise_host: Host | None = None
    secret: SecretRef | None = None
    engine_name: str | None = None
    model_name: str | None = None
    transfer_timeout_s: Seconds = 30.0
    lease_s: Seconds = 30.0
    grant_wait_s: Seconds = 30.0
    heartbeat_s: Seconds = 2.0
    status_window_s: Seconds = 60.0
    idle_wait_s: Annotated[float, Field(ge=0, le=0.1)] = 0.005
    log_transfers: Literal["info", "debug"] = "debug"
    cache: CacheSettings | None = None
    staging: Literal["auto", "always", "never"] = "auto"
    staging_bytes: PositiveSize = 1 << 30
    faults: Faults = Faults()


@dataclass(frozen=True)
class Resolved:
    """Settings with the topology reference followed and the secret read."""

    transport: Any
    control_host: str
    control_port: int | None
    advertise_host: str
    secret: bytes
    secret_source: str
    engine_name: str | None
    model_name: str | None
    transfer_timeout_s: float
    lease_s: float
    grant_wait_s: float
    heartbeat_s: float
    status_window_s: float
    idle_wait_s: float
    log_transfers: str
    faults: Faults
    cache: CacheSettings | None = None
    staging: str = "auto"
    staging_bytes: int = 1 << 30


def parse_settings(extra: dict[str, Any] | None) -> ConnectorSettings:
    try:
        return ConnectorSettings.model_validate(extra or {})
    except ValidationError as exc:
        raise problems_error(validation_problems(exc, ConnectorSettings), SOURCE) from None


def resolve_settings(extra: dict[str, Any] | None, *, needs_control_port: bool) -> Resolved:
    """Validate and resolve; raises ``ConfigError`` naming ``kv_connector_extra_config.<key>``."""
    s = parse_settings(extra)
    if s.topology is None:
        if s.instance is not None:
            raise ConfigError("'instance' needs 'topology' (the file that names it)", path="instance", source=SOURCE)
        transport = s.transport or TcpTransport()
        host, port = s.control_host or "127.0.0.1", s.control_port
        secret, secret_source = _secret(s.secret, None, None)
        cache = s.cache
    else:
        transport, host, port, secret, secret_source, cache = _from_topology(s)
    if cache is not None:
        cache.check()
    if needs_control_port and port is None:
        raise ConfigError(
            "a producer needs a control endpoint consumers can reach: set 'control_port' "
            "(or the instance's control_port in the topology)",
            path="control_port",
            source=SOURCE,
        )
    return Resolved(
        transport=transport,
        control_host=host,
        control_port=port,
        advertise_host=s.advertise_host or host,
        secret=secret,
        secret_source=secret_source,
        engine_name=s.engine_name,
        model_name=s.model_name,
        transfer_timeout_s=s.transfer_timeout_s,
        lease_s=s.lease_s,
        grant_wait_s=s.grant_wait_s,
        heartbeat_s=s.heartbeat_s,
        status_window_s=s.status_window_s,
        idle_wait_s=s.idle_wait_s,
        log_transfers=s.log_transfers,
        faults=s.faults,
        cache=cache,
        staging=s.staging,
        staging_bytes=s.staging_bytes,
    )


def _topology_cache(topo_cache: CacheConfig | None, inline: CacheSettings | None,
                    local_tokens: int) -> CacheSettings | None:
    """The topology's ``cache`` section as connector settings (inline ``cache`` keys other
    than where the cache lives, e.g. ``store``, ``salt``, ``timeout_s``, still apply).
    ``local_compute_tokens`` defaults to the proxy's ``cache_local_tokens`` of the same
    topology, so the proxy's "mostly cached" and the connector's agree by default."""
    if topo_cache is None:
        return inline
    if inline is not None and (inline.server is not None or inline.tiers is not None):
        raise ConfigError("'cache.server'/'cache.tiers' come from the topology file's cache section when "
                          "'topology' is set; keep only store/salt/timeout_s here", path="cache", source=SOURCE)
    extra = inline.model_dump(exclude={"server", "tiers", "chunk_tokens"}) if inline is not None else {}
    if inline is None or "local_compute_tokens" not in inline.model_fields_set:
        extra["local_compute_tokens"] = local_tokens
    srv = topo_cache.server
    where: dict[str, Any] = ({"server": f"{srv.host}:{srv.port}"} if srv is not None
                             else {"tiers": list(topo_cache.tiers)})
    return CacheSettings.model_validate({**extra, **where, "chunk_tokens": topo_cache.chunk_tokens}, strict=False)


def _from_topology(s: ConnectorSettings) -> tuple[Any, str, int | None, bytes, str, CacheSettings | None]:
    for key in _TOPOLOGY_OWNS:
        if getattr(s, key) is not None:
            raise ConfigError(
                f"'{key}' comes from the topology file when 'topology' is set; remove one of them",
                path=key,
                source=SOURCE,
            )
    if s.instance is None:
        raise ConfigError("'topology' needs 'instance': the name of this engine in that file", path="instance", source=SOURCE)
    assert s.topology is not None
    topo = load_topology(Path(s.topology))
    names = [i.name for i in topo.instances]
    inst = next((i for i in topo.instances if i.name == s.instance), None)
    if inst is None:
        raise ConfigError(f"no instance named {s.instance!r} in {s.topology}; instances are {names}", path="instance", source=SOURCE)
    secret = topo.shared_secret()
    if secret is not None and s.secret is not None:
        raise ConfigError("'secret' is set both here and in the topology file; remove one of them",
                          path="secret", source=SOURCE)
    cache = _topology_cache(topo.cache, s.cache, topo.proxy.cache_local_tokens)
    if secret is None:  # e.g. the launcher's per-launch secret for a topology that names none
        value, where = _secret(s.secret, None, None)
        return topo.transport, inst.host, inst.control_port, value, where, cache
    return topo.transport, inst.host, inst.control_port, secret.encode(), f"topology {s.topology}", cache


def _secret(ref: SecretRef | None, base: str | None, source: str | None) -> tuple[bytes, str]:
    if ref is None:
        return b"", "none"
    value = resolve_secret(ref, path="secret", source=source or SOURCE, base_dir=base or os.getcwd())
    return value.encode(), ref.describe()
