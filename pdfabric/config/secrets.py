"""Secrets by reference: ``{env: VAR}`` or ``{file: path}``, never an inline value.

A topology names where a secret lives; the value is read only when it is used
(``resolve_secret``), so YAML files, ``config show`` output and logs never hold one.
This is the one module of the config plane that reads ``os.environ``.

Relative ``file:`` paths are taken relative to ``base_dir`` (the directory of the
topology file when it was loaded from disk), otherwise to the working directory.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator

from pdfabric.errors import ConfigError

__all__ = ["SecretRef", "resolve_secret", "secret_problem"]

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_HINT = "give a reference instead: {env: VAR_NAME} or {file: path/to/secret}"


class SecretRef(BaseModel):
    """Where a secret lives: exactly one of ``env`` (a variable name) or ``file`` (a path)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    env: str | None = None
    file: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _one_reference(cls, data: Any) -> Any:
        if isinstance(data, SecretRef):
            return data
        if not isinstance(data, dict):
            raise ValueError(
                f"secrets are never written inline; {_HINT}, got {_kind_of(data)}"
            )
        unknown = sorted(str(k) for k in data if k not in ("env", "file"))
        if unknown:
            raise ValueError(f"unknown key {unknown[0]!r} in a secret reference; {_HINT}")
        given = [k for k in ("env", "file") if data.get(k) is not None]
        if len(given) != 1:
            got = "both" if given else "neither"
            raise ValueError(f"expected exactly one of env or file, got {got}")
        value = data[given[0]]
        if not isinstance(value, str) or not value:
            raise ValueError(f"expected {given[0]} to be a non-empty string, got {value!r}")
        if given[0] == "env" and not _ENV_NAME.fullmatch(value):
            raise ValueError(
                f"expected an environment variable name (letters, digits, '_'), got {value!r}"
            )
        return data

    def describe(self) -> str:
        """``env PDFABRIC_SECRET`` or ``file secrets/hmac.key``; never the value."""
        return f"env {self.env}" if self.env is not None else f"file {self.file}"


def _kind_of(value: Any) -> str:
    if isinstance(value, str):
        return "an inline string"
    if isinstance(value, (list, tuple)):
        return "a list"
    return f"{type(value).__name__} {value!r}"


def _secret_file(ref: SecretRef, base_dir: str | os.PathLike[str] | None) -> Path:
    path = Path(ref.file or "").expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = Path(base_dir) / path
    return path


def secret_problem(
    ref: SecretRef, *, base_dir: str | os.PathLike[str] | None = None
) -> str | None:
    """Why ``ref`` cannot be resolved right now, or ``None`` when it can."""
    try:
        _read(ref, base_dir)
    except _Unresolved as exc:
        return str(exc)
    return None


class _Unresolved(Exception):
    pass


def _read(ref: SecretRef, base_dir: str | os.PathLike[str] | None) -> str:
    if ref.env is not None:
        value = os.environ.get(ref.env)
        if value is None:
            raise _Unresolved(f"environment variable {ref.env} is not set; export it")
        if not value.strip():
            raise _Unresolved(f"environment variable {ref.env} is set but empty")
        return value.strip()
    path = _secret_file(ref, base_dir)
    try:
        value = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise _Unresolved(f"secret file {path} does not exist") from None
    except IsADirectoryError:
        raise _Unresolved(f"secret file {path} is a directory") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise _Unresolved(f"secret file {path} cannot be read: {exc}") from None
    if not value.strip():
        raise _Unresolved(f"secret file {path} is empty")
    return value.strip()


def resolve_secret(
    ref: SecretRef,
    *,
    path: str | None = None,
    source: str | None = None,
    base_dir: str | os.PathLike[str] | None = None,
) -> str:
    """Read the secret ``ref`` points at, surrounding whitespace stripped.

    ``path`` (``cache.tiers[2].password``) and ``source`` (the topology file) only
    shape the error message. Raises ``ConfigError`` when the variable is unset or
    empty, or the file is missing, unreadable or empty.
    """
    try:
        return _read(ref, base_dir)
    except _Unresolved as exc:
        raise ConfigError(str(exc), path=path, source=source) from None
