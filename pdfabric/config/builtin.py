"""Topologies shipped with pdfabric: the repository's ``configs/``, which a wheel installs
as ``pdfabric/configs/``. Every command that takes a topology FILE also takes one of their
names (``cpu-1p1d-shm``); ``pdfabric launch`` without a FILE runs ``DEFAULT``.
"""

from __future__ import annotations

from pathlib import Path

from pdfabric.errors import ConfigError

__all__ = ["DEFAULT", "builtin_dir", "builtin_names", "topology_path"]

DEFAULT = "cpu-1p1d-tcp"


def builtin_dir() -> Path:
    """Installed package data first, then the repository (a checkout or editable install)."""
    package = Path(__file__).resolve().parent.parent
    for path in (package / "configs", package.parent / "configs"):
        if path.is_dir():
            return path
    raise ConfigError("the built-in topologies are not installed; reinstall pdfabric", source="pdfabric/configs")


def builtin_names() -> list[str]:
    return sorted(p.stem for p in builtin_dir().glob("*.yaml"))


def topology_path(arg: str | None) -> tuple[Path, bool]:
    """(file, built in) for a FILE argument: a file that exists, as given; else the
    built-in topology of that name (with or without ``.yaml``); None: ``DEFAULT``.
    ConfigError when it is neither."""
    if arg is None:
        arg = DEFAULT
    elif Path(arg).exists() or "/" in arg:
        return Path(arg), False  # the loader reports what is wrong with it
    f = builtin_dir() / f"{arg.removesuffix('.yaml')}.yaml"
    if f.is_file():
        return f, True
    raise ConfigError(f"no such file, and no built-in topology of that name (built in: {', '.join(builtin_names())})",
                      source=arg)
