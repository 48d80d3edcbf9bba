"""Transport names -> classes, imported lazily so optional backends cost nothing."""

from __future__ import annotations

import functools
import importlib
import socket
from typing import Any

from pdfabric.errors import TransportUnavailable

from .base import Transport

__all__ = ["TRANSPORTS", "transport_class", "create", "create_from_config", "available", "local_host_id"]

# name -> (module, class, install hint)
TRANSPORTS: dict[str, tuple[str, str, str]] = {
    "tcp": ("pdfabric.transports.tcp", "TcpTransport", ""),
    "shm": ("pdfabric.transports.shm", "ShmTransport", ""),
    "loopback": ("pdfabric.transports.loopback", "LoopbackTransport", ""),
    "nixl": ("pdfabric.transports.nixl", "NixlTransport",
             "pip install --no-deps nixl nixl-cu12 nixl-cu13 (--no-deps keeps the installed torch build; "
             "pip install 'pdfabric[nixl]' pulls torch from PyPI where none is installed yet)"),
    "ucx": ("pdfabric.transports.ucx", "UcxTransport",
            "pip install ucxx-cu12==0.52.0 libucx-cu12==1.21.0 (or pip install 'pdfabric[ucx]'); no GPU needed"),
    "cuda_ipc": ("pdfabric.transports.cuda_ipc", "CudaIpcTransport", "pip install 'pdfabric[cuda]' on a CUDA machine"),
}


def transport_class(name: str) -> type[Transport]:
    """The class for ``name``; TransportUnavailable (with the fix) when it cannot load, or
    when its module's ``unavailable_reason()`` says it cannot run on this machine."""
    try:
        module, cls, hint = TRANSPORTS[name]
    except KeyError:
        raise TransportUnavailable(
            f"unknown transport {name!r}; expected one of {', '.join(sorted(TRANSPORTS))}"
        ) from None
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        if e.name == module:
            raise TransportUnavailable(
                f"transport {name!r} is not implemented in pdfabric {_version()} yet", transport=name
            ) from e
        fix = f" - {hint}" if hint else ""
        raise TransportUnavailable(f"transport {name!r} is not available: {e}{fix}", transport=name) from e
    # a backend whose module imports everywhere says here what an import cannot tell
    # (cuda_ipc: no CUDA device); the reason names the fix
    reason = getattr(mod, "unavailable_reason", lambda: "")()
    if reason:
        raise TransportUnavailable(f"transport {name!r} is not available: {reason}", transport=name)
    result: type[Transport] = getattr(mod, cls)
    return result


def create(name: str, **options: Any) -> Transport:
    """Instantiate transport ``name`` with its keyword options."""
    return transport_class(name)(**options)


def create_from_config(config: Any, **overrides: Any) -> Transport:
    """Build a transport from a topology transport model (``kind`` + its options);
    ``overrides`` are constructor options the model does not carry (a bind host)."""
    options = config.model_dump()
    options.update(overrides)
    return create(options.pop("kind"), **options)


def available() -> dict[str, str]:
    """Each known transport -> "" when usable here, else the reason it is not."""
    out: dict[str, str] = {}
    for name in TRANSPORTS:
        try:
            transport_class(name)
            out[name] = ""
        except TransportUnavailable as e:
            out[name] = e.message
    return out


@functools.cache
def local_host_id() -> str:
    """Identity of this machine (boot id + hostname), to tell same-host peers apart."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = "noboot"
    return f"{socket.gethostname()}/{boot}"


def _version() -> str:
    from pdfabric import __version__

    return __version__
