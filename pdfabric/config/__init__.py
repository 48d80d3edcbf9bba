"""Topology configuration: one YAML file -> frozen pydantic v2 models.

``load_topology(path)`` reads and validates a topology file; every failure is a
``pdfabric.errors.ConfigError`` naming the file, the path inside it
(``instances[1].port``), what was expected and what came. Secrets are references
(``{env: VAR}`` / ``{file: path}``) resolved at use time with ``resolve_secret``.
"""

from __future__ import annotations

from pdfabric.config.loader import load_topology, parse_topology
from pdfabric.config.models import (
    ByteSize,
    CacheConfig,
    CacheServer,
    CacheTier,
    CudaIpcTransport,
    DiskTier,
    Instance,
    Link,
    LoopbackTransport,
    MemoryTier,
    ModelConfig,
    NixlTransport,
    ProxyConfig,
    RedisTier,
    Role,
    S3Tier,
    ShmTransport,
    TcpTransport,
    Topology,
    TransportConfig,
    UcxTransport,
)
from pdfabric.config.secrets import SecretRef, resolve_secret

__all__ = [
    "load_topology",
    "parse_topology",
    "resolve_secret",
    "Topology",
    "ModelConfig",
    "Instance",
    "Role",
    "Link",
    "TransportConfig",
    "TcpTransport",
    "ShmTransport",
    "LoopbackTransport",
    "NixlTransport",
    "UcxTransport",
    "CudaIpcTransport",
    "CacheConfig",
    "CacheServer",
    "CacheTier",
    "MemoryTier",
    "DiskTier",
    "RedisTier",
    "S3Tier",
    "ProxyConfig",
    "SecretRef",
    "ByteSize",
]
