"""Pydantic v2 models of a topology file (one YAML file describes one deployment).

Shape (``name``, ``version``, ``model``, ``secret``, ``transport``, ``instances``,
``links``, ``cache``, ``proxy``)::

    Topology
    ├── model: ModelConfig                 exactly one of path / builtin
    ├── secret: SecretRef | None           HMAC shared secret of the control plane
    ├── transport: TransportConfig         default for every P->D pair (kind: tcp|shm|...)
    ├── instances: [Instance, ...]         role prefill|decode|both, host, ports, devices
    ├── links: [Link, ...]                 per-pair transport overrides
    ├── cache: CacheConfig | None          tiers memory -> disk -> redis/s3
    └── proxy: ProxyConfig                 routing policy, pairing, limits

Rules:

1. Every model is frozen, refuses unknown keys and is strict: YAML ``"8100"`` is not a
   port, ``yes`` is not a stream count. Enums are ``Literal``; transports and cache tiers
   are unions discriminated on ``kind``.
2. Sizes (``"4GiB"``) go through ``pdfabric.units.parse_size`` only (``ByteSize``).
3. Secrets are references (``SecretRef``); values are read at use time.
4. Checks that span fields (port collisions, names, roles, links, tier order) run on the
   root (``pdfabric.config.checks``) and report every problem, each with its own path, by
   raising ``FieldProblems``.
5. Relative paths in a topology are relative to the topology file's directory
   (``Topology.resolve_path``); the loader records where a topology came from.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    PrivateAttr,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from pdfabric.config.checks import (
    FieldProblems,
    Problem,
    problems_error,
    topology_problems,
    unknown_name,
)
from pdfabric.config.secrets import SecretRef, resolve_secret, secret_problem
from pdfabric.errors import ConfigError
from pdfabric.units import parse_size

__all__ = [
    "ByteSize",
    "Role",
    "ModelConfig",
    "TcpTransport",
    "ShmTransport",
    "LoopbackTransport",
    "NixlTransport",
    "UcxTransport",
    "CudaIpcTransport",
    "TransportConfig",
    "Instance",
    "Link",
    "MemoryTier",
    "DiskTier",
    "RedisTier",
    "S3Tier",
    "CacheTier",
    "CacheServer",
    "CacheConfig",
    "ProxyConfig",
    "Topology",
]

Role = Literal["prefill", "decode", "both"]


ByteSize = Annotated[int, BeforeValidator(parse_size)]
"""A byte count written as ``"4GiB"``, ``"256KiB"``, ``"64MB"`` or a plain integer."""

Port = Annotated[int, Field(ge=1, le=65535)]
Count = Annotated[int, Field(ge=1)]
Seconds = Annotated[float, Field(gt=0)]
PositiveSize = Annotated[ByteSize, Field(gt=0)]

_INSTANCE_NAME = re.compile(r"[a-z0-9][a-z0-9-]*")
_TOPOLOGY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_FLAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


_RESERVED_NAMES = ("proxy", "cache-server")  # the launcher's other processes (logs, --only)


def _instance_name(value: str) -> str:
    if not _INSTANCE_NAME.fullmatch(value):
        raise ValueError(
            f"expected lowercase letters, digits and '-' (like 'prefill-0'), got {value!r}"
        )
    if value in _RESERVED_NAMES:
        raise ValueError(f"{value!r} names the launcher's {value} process; choose another instance name")
    return value


def _topology_name(value: str) -> str:
    if not _TOPOLOGY_NAME.fullmatch(value):
        raise ValueError(
            f"expected letters, digits, '.', '_' and '-' (like 'cpu-1p1d-tcp'), got {value!r}"
        )
    return value


def _host(value: str) -> str:
    bad = not value or "://" in value or any(c.isspace() for c in value) or "/" in value
    if bad or (value.count(":") == 1):
        raise ValueError(
            f"expected a host name or IP address without scheme or port, got {value!r}"
        )
    return value


def _engine_arg(value: Any) -> str | int | float | bool:
    if isinstance(value, (str, int, float, bool)):
        return value
    got = {dict: "a mapping", list: "a list"}.get(type(value), repr(value))
    raise ValueError(f"expected a string, number or boolean, got {got}")


InstanceName = Annotated[str, AfterValidator(_instance_name)]
Host = Annotated[str, AfterValidator(_host)]
EngineArg = Annotated[
    Union[str, int, float, bool],
    PlainValidator(_engine_arg),
    WithJsonSchema({"type": ["string", "number", "boolean"]}),
]


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


# --------------------------------------------------------------------------- model


class ModelConfig(_Frozen):
    """The model every instance serves: a local ``path`` or a ``builtin`` test model."""

    path: Annotated[str, Field(min_length=1)] | None = None
    builtin: Literal["tiny-llama"] | None = None
    served_name: Annotated[str, Field(min_length=1)] | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    block_size: Count = 32
    max_model_len: Count | None = None

    @model_validator(mode="after")
    def _one_source(self) -> ModelConfig:
        if (self.path is None) == (self.builtin is None):
            got = "both" if self.path is not None else "neither"
            raise ValueError(f"expected exactly one of path or builtin, got {got}")
        return self

    @property
    def display_name(self) -> str:
        """The name clients use: ``served_name``, else the builtin name or the path."""
        return self.served_name or self.builtin or str(self.path)


# ----------------------------------------------------------------------- transports


class TcpTransport(_Frozen):
    """Zero-copy TCP over ``streams`` parallel connections; works between any hosts."""

    kind: Literal["tcp"] = "tcp"
    transfer_timeout_s: Seconds = 30.0
    streams: Annotated[int, Field(ge=1, le=64)] = 2
    connect_timeout_s: Seconds = 5.0


class ShmTransport(_Frozen):
    """Same-host single copy (receiver-side cross-memory attach); CPU memory."""

    kind: Literal["shm"] = "shm"
    transfer_timeout_s: Seconds = 30.0
    streams: Annotated[int, Field(ge=1, le=64)] = 2
    connect_timeout_s: Seconds = 5.0


class LoopbackTransport(_Frozen):
    """In-process reference transport, for tests."""

    kind: Literal["loopback"] = "loopback"


class NixlTransport(_Frozen):
    """NIXL agent with the UCX backend (RDMA where present)."""

    kind: Literal["nixl"] = "nixl"
    transfer_timeout_s: Seconds = 30.0
    backend: Literal["UCX"] = "UCX"
    progress_thread: bool = False
    ucx_error_handling: Literal["none", "peer"] = "none"


class UcxTransport(_Frozen):
    """UCX via ucxx worker-address endpoints.

    ``ucx_error_handling``: ``peer`` (default) survives any peer's death; on one host its
    large segments take one cross-memory copy where the process's UCX has a registration
    cache, TCP otherwise; ``none`` adds shared memory for small messages, and a receiver
    dying mid-copy aborts the sender's process."""

    kind: Literal["ucx"] = "ucx"
    tls: Annotated[str, Field(min_length=1)] | None = None
    net_devices: Annotated[str, Field(min_length=1)] | None = None
    ucx_error_handling: Literal["none", "peer"] = "peer"
    rndv_scheme: Literal["put_zcopy", "get_zcopy", "auto"] = "put_zcopy"
    connect_timeout_s: Seconds = 5.0
    transfer_timeout_s: Seconds = 30.0
    peer_timeout_s: Seconds = 10.0


class CudaIpcTransport(_Frozen):
    """CUDA IPC handles and device-to-device copies; one host, GPU."""

    kind: Literal["cuda_ipc"] = "cuda_ipc"
    transfer_timeout_s: Seconds = 30.0


TransportConfig = Annotated[
    Union[
        TcpTransport, ShmTransport, LoopbackTransport, NixlTransport, UcxTransport, CudaIpcTransport
    ],
    Field(discriminator="kind"),
]

# ------------------------------------------------------------------------ instances

_RESERVED_ARGS = {
    "model": "model.path / model.builtin",
    "host": "instances[].host",
    "port": "instances[].port",
    "block-size": "model.block_size",
    "tensor-parallel-size": "instances[].tensor_parallel_size",
    "served-model-name": "model.served_name",
    "dtype": "model.dtype",
    "max-model-len": "model.max_model_len",
    "kv-transfer-config": "pdfabric itself (the connector)",
}


class Instance(_Frozen):
    """One vLLM engine: its role, where it listens and what it runs on."""

    name: InstanceName
    role: Role
    host: Host = "127.0.0.1"
    port: Port
    control_port: Port | None = None
    devices: list[Annotated[int, Field(ge=0)]] = []
    tensor_parallel_size: Count = 1
    engine_args: dict[str, EngineArg] = {}
    env: dict[str, str] = {}

    @property
    def can_prefill(self) -> bool:
        """Role ``prefill`` or ``both``."""
        return self.role in ("prefill", "both")

    @property
    def can_decode(self) -> bool:
        """Role ``decode`` or ``both``."""
        return self.role in ("decode", "both")

    @field_validator("devices")
    @classmethod
    def _unique_devices(cls, value: list[int]) -> list[int]:
        dup = sorted({d for d in value if value.count(d) > 1})
        if dup:
            raise ValueError(f"expected each device once, got {dup[0]} more than once")
        return value

    @field_validator("engine_args")
    @classmethod
    def _flags(cls, value: dict[str, Any]) -> dict[str, Any]:
        problems: list[Problem] = []
        for key in value:
            if key.startswith("-"):
                msg = f"write {key!r} without leading dashes: {key.lstrip('-')!r}"
            elif not _FLAG.fullmatch(key):
                msg = f"expected a vLLM flag name like 'max-num-seqs', got {key!r}"
            elif (owner := _RESERVED_ARGS.get(key.replace("_", "-"))) is not None:
                msg = f"{key!r} is set by the topology ({owner}), not engine_args"
            else:
                continue
            problems.append(("", msg))
        if problems:
            raise FieldProblems(problems)
        return value

    @field_validator("env")
    @classmethod
    def _env_names(cls, value: dict[str, str]) -> dict[str, str]:
        for key in value:
            if not _ENV_NAME.fullmatch(key):
                raise ValueError(
                    f"expected environment variable names (letters, digits, '_'), got {key!r}"
                )
        return value


class Link(_Frozen):
    """A transport override for one prefill -> decode pair."""

    prefill: InstanceName
    decode: InstanceName
    transport: TransportConfig


# ---------------------------------------------------------------------------- cache


class MemoryTier(_Frozen):
    """L1: CPU memory (pinned where CUDA is present)."""

    kind: Literal["memory"] = "memory"
    size: PositiveSize


class DiskTier(_Frozen):
    """L2: a local directory."""

    kind: Literal["disk"] = "disk"
    path: Annotated[str, Field(min_length=1)]
    size: PositiveSize
    read_threads: Annotated[int, Field(ge=1, le=16)] = 2


class RedisTier(_Frozen):
    """L3: Redis or Valkey. The password is a reference, never part of ``url``."""

    kind: Literal["redis"] = "redis"
    url: str
    password: SecretRef | None = None
    ttl_s: Count | None = None

    @field_validator("url")
    @classmethod
    def _redis_url(cls, value: str) -> str:
        m = re.match(r"^(redis|rediss|unix)://([^/@]*@)?", value)
        if not m:
            raise ValueError(
                f"expected a URL like 'redis://host:6379/0' (redis, rediss or unix), got {value!r}"
            )
        if m.group(2) and ":" in m.group(2):
            raise ValueError(
                "the URL holds a password; move it to password: {env: VAR} or {file: path}"
            )
        return value


class S3Tier(_Frozen):
    """L3: an S3-compatible object store. Keys are references."""

    kind: Literal["s3"] = "s3"
    endpoint: str | None = None
    bucket: Annotated[str, Field(min_length=1)]
    prefix: str = ""
    region: str | None = None
    access_key: SecretRef | None = None
    secret_key: SecretRef | None = None

    @field_validator("endpoint")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^https?://[^\s/]+", value):
            raise ValueError(
                f"expected an http(s) URL like 'http://127.0.0.1:9000', got {value!r}"
            )
        return value


CacheTier = Annotated[Union[MemoryTier, DiskTier, RedisTier, S3Tier], Field(discriminator="kind")]


class CacheServer(_Frozen):
    """The cache-server daemon that owns L1/L2 for a host: engines on ``port`` (ZMQ),
    ``/health``, ``/metrics`` and the admin API on ``http_port`` (default ``port + 1``)."""

    host: Host = "127.0.0.1"
    port: Port
    http_port: Port | None = None
    lease_ttl_s: Seconds = 60.0

    @property
    def http(self) -> int:
        return self.http_port if self.http_port is not None else self.port + 1


class CacheConfig(_Frozen):
    """The shared tiered KV cache: chunking and tiers, fastest first."""

    chunk_tokens: Count = 256
    server: CacheServer | None = None
    tiers: Annotated[list[CacheTier], Field(min_length=1)]


# ---------------------------------------------------------------------------- proxy


class ProxyConfig(_Frozen):
    """The routing proxy: where it listens, how it pairs P and D, its limits.

    ``cache_lookup``: ask the topology's cache server (``cache.server``) how much of each
    prompt is cached; a prompt cached but for at most ``cache_local_tokens`` tokens goes to a
    decode engine alone (engines of this topology take it as their connector's
    ``cache.local_compute_tokens`` unless their extra config sets it).
    Tokenizing and asking take at most ``cache_timeout_s``; past it the request is paired."""

    host: Host = "127.0.0.1"
    port: Port = 8000
    policy: Literal["round_robin", "least_loaded", "prefix_aware"] = "round_robin"
    pairing: Literal["concurrent", "sequential"] = "concurrent"
    disaggregate_min_tokens: Annotated[int, Field(ge=0)] = 0
    api_keys: SecretRef | None = None
    leg_timeout_s: Seconds = 600.0
    max_body: PositiveSize = parse_size("8MiB")
    health_interval_s: Seconds = 2.0
    prefill_attempts: Annotated[int, Field(ge=1)] = 2
    decode_attempts: Annotated[int, Field(ge=1)] = 2
    cache_lookup: bool = False
    cache_local_tokens: Annotated[int, Field(ge=0)] = 256
    cache_timeout_s: Seconds = 0.2


# ------------------------------------------------------------------------- topology

class Topology(_Frozen):
    """One deployment: model, instances, transports, cache and proxy.

    Build it with ``pdfabric.config.load_topology`` (which names the file in errors) or
    ``Topology.model_validate(data, context={"source": ..., "base_dir": ...})``.
    """

    name: Annotated[str, AfterValidator(_topology_name)]
    version: Literal[1] = 1
    model: ModelConfig
    secret: SecretRef | None = None
    transport: TransportConfig = TcpTransport()
    instances: Annotated[list[Instance], Field(min_length=1)]
    links: list[Link] = []
    cache: CacheConfig | None = None
    proxy: ProxyConfig = ProxyConfig()

    _source: str | None = PrivateAttr(default=None)
    _base_dir: str | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _cross_checks(self, info: ValidationInfo) -> Topology:
        ctx = info.context if isinstance(info.context, dict) else {}
        self._source = ctx.get("source")
        self._base_dir = None if ctx.get("base_dir") is None else str(ctx["base_dir"])
        problems = topology_problems(self)
        if problems:
            raise FieldProblems(problems)
        return self

    # -- origin ----------------------------------------------------------------------

    @property
    def source(self) -> str | None:
        """The file this topology was loaded from, as given, or ``None``."""
        return self._source

    def resolve_path(self, path: str) -> Path:
        """``path`` with ``~`` expanded, relative to the topology file's directory."""
        p = Path(path).expanduser()
        if not p.is_absolute() and self._base_dir is not None:
            p = Path(self._base_dir) / p
        return p

    # -- instances and links ---------------------------------------------------------

    def instance(self, name: str) -> Instance:
        """The instance called ``name``; ``ConfigError`` if there is none."""
        for inst in self.instances:
            if inst.name == name:
                return inst
        names = [i.name for i in self.instances]
        raise ConfigError(unknown_name(name, names), source=self._source)

    @property
    def prefill_instances(self) -> tuple[Instance, ...]:
        """Instances with role ``prefill`` or ``both``."""
        return tuple(i for i in self.instances if i.can_prefill)

    @property
    def decode_instances(self) -> tuple[Instance, ...]:
        """Instances with role ``decode`` or ``both``."""
        return tuple(i for i in self.instances if i.can_decode)

    def transport_for(self, prefill: str, decode: str) -> TransportConfig:
        """The transport of the ``prefill -> decode`` pair: its link override or the default."""
        p, d = self.instance(prefill), self.instance(decode)
        if not p.can_prefill or not d.can_decode:
            bad = p if not p.can_prefill else d
            msg = f"{prefill!r} -> {decode!r} is not a P->D pair: {bad.name!r} has role {bad.role}"
            raise ConfigError(msg, source=self._source)
        for link in self.links:
            if (link.prefill, link.decode) == (prefill, decode):
                return link.transport
        return self.transport

    def pairs(self) -> list[tuple[Instance, Instance, TransportConfig]]:
        """Every prefill -> decode pair of two distinct instances, with its transport."""
        return [
            (p, d, self.transport_for(p.name, d.name))
            for p in self.prefill_instances
            for d in self.decode_instances
            if p.name != d.name
        ]

    # -- secrets ---------------------------------------------------------------------

    def secret_refs(self) -> list[tuple[str, SecretRef]]:
        """Every secret reference in the topology with its path (``proxy.api_keys``)."""
        return list(_walk_secrets(self, ""))

    def secret_problems(self) -> list[tuple[str, str]]:
        """(path, message) of every secret that cannot be read right now."""
        return [
            (path, msg)
            for path, ref in self.secret_refs()
            if (msg := secret_problem(ref, base_dir=self._base_dir)) is not None
        ]

    def check_secrets(self) -> None:
        """Raise ``ConfigError`` listing every secret that cannot be read right now."""
        problems = self.secret_problems()
        if problems:
            raise problems_error(problems, self._source)

    def resolve_secret(self, ref: SecretRef, *, path: str | None = None) -> str:
        """Read the secret ``ref`` (one of this topology's) now; ``ConfigError`` if it cannot."""
        return resolve_secret(ref, path=path, source=self._source, base_dir=self._base_dir)

    def shared_secret(self) -> str | None:
        """The control-plane HMAC secret, or ``None`` when the topology names none."""
        return None if self.secret is None else self.resolve_secret(self.secret, path="secret")


def _walk_secrets(node: Any, prefix: str) -> Iterator[tuple[str, SecretRef]]:
    if isinstance(node, SecretRef):
        yield prefix, node
    elif isinstance(node, BaseModel):
        for field in type(node).model_fields:
            path = f"{prefix}.{field}" if prefix else field
            yield from _walk_secrets(getattr(node, field), path)
    elif isinstance(node, list):
        for i, item in enumerate(node):
            yield from _walk_secrets(item, f"{prefix}[{i}]")
