"""Load a topology file: YAML text -> ``Topology``, every failure a ``ConfigError``.

Error messages name the file, the path inside it (``instances[1].port``), what was
expected, what came, and the line: ``configs/x.yaml: instances[1].port: expected an
integer 1-65535, got 70000 (line 14)``. Several problems give one line each.

Pydantic's errors are translated here, walking the model types alongside each error
location so that discriminator tags (``transport.tcp.streams``) drop out of the path and
range errors can state the whole range. YAML duplicate keys are refused (PyYAML would
silently keep the last one).
"""

from __future__ import annotations

import difflib
import os
import re
import types
from pathlib import Path
from typing import Annotated, Any, Union, get_args, get_origin

import yaml
from annotated_types import Ge, Gt, Le, Lt
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails
from yaml.nodes import MappingNode, Node, SequenceNode

from pdfabric.config.checks import FieldProblems, Problem, problems_error
from pdfabric.config.models import ByteSize, Topology
from pdfabric.errors import ConfigError

__all__ = ["load_topology", "parse_topology"]

_SIZE_PARSER = get_args(ByteSize)[1]  # marks a size field in a type's metadata


def load_topology(path: str | os.PathLike[str], *, check_secrets: bool = False) -> Topology:
    """Read and validate the topology file at ``path``.

    Relative paths inside it (secret files, ...) are taken relative to its directory.
    With ``check_secrets`` every secret reference must be readable now. Raises
    ``ConfigError`` for a missing or unreadable file, bad YAML or an invalid topology.
    """
    source = os.fspath(path)
    file = Path(source)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("no such file", source=source) from None
    except IsADirectoryError:
        raise ConfigError("is a directory; expected a YAML topology file", source=source) from None
    except UnicodeDecodeError:
        raise ConfigError("is not UTF-8 text; expected YAML", source=source) from None
    except OSError as exc:
        raise ConfigError(f"cannot be read: {exc.strerror or exc}", source=source) from None
    return parse_topology(
        text, source=source, base_dir=file.resolve().parent, check_secrets=check_secrets
    )


def parse_topology(
    text: str,
    *,
    source: str | None = None,
    base_dir: str | os.PathLike[str] | None = None,
    check_secrets: bool = False,
) -> Topology:
    """Validate topology YAML ``text``; ``source`` names it in errors.

    ``base_dir`` anchors relative paths (default: the working directory).
    Raises ``ConfigError`` listing every problem found.
    """
    data, root = _parse_yaml(text, source)
    if data is None:
        raise ConfigError(
            "the file is empty; expected a topology mapping (name, model, instances, ...)",
            source=source,
        )
    if not isinstance(data, dict):
        raise ConfigError(
            f"expected a mapping at the top level (name, model, instances, ...), got {_show(data)}",
            source=source,
        )
    context = {"source": source, "base_dir": None if base_dir is None else os.fspath(base_dir)}
    try:
        topology = Topology.model_validate(data, context=context)
    except ValidationError as exc:
        problems = [(p, m + _line_of(root, p)) for p, m in _problems(exc)]
        raise problems_error(problems, source) from None
    if check_secrets and (missing := topology.secret_problems()):
        raise problems_error([(p, m + _line_of(root, p)) for p, m in missing], source)
    return topology


# ----------------------------------------------------------------------------- YAML


class _Loader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys in a mapping."""


def _construct_mapping(loader: _Loader, node: MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=deep)
        try:
            duplicate = key in seen
            seen.add(key)
        except TypeError:  # unhashable key: construct_mapping reports it
            continue
        if duplicate:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping", node.start_mark,
                f"found duplicate key {key!r}", key_node.start_mark,
            )
    return loader.construct_mapping(node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _parse_yaml(text: str, source: str | None) -> tuple[Any, Node | None]:
    loader = _Loader(text)
    try:
        root = loader.get_single_node()
        data = None if root is None else loader.construct_document(root)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = "" if mark is None else f" at line {mark.line + 1}, column {mark.column + 1}"
        what = "; ".join(x for x in (exc.context, exc.problem) if x) or "cannot be parsed"
        raise ConfigError(f"invalid YAML{where}: {what}", source=source) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid YAML: {exc}", source=source) from None
    finally:
        loader.dispose()
    return data, root


_SEGMENT = re.compile(r"\.?([A-Za-z_][A-Za-z0-9_-]*)|\[(\d+)\]")


def _line_of(root: Node | None, path: str) -> str:
    """`` (line N)`` for the deepest YAML node on ``path``, or ``""``."""
    node, line = root, None
    for m in _SEGMENT.finditer(path):
        key, index = m.group(1), m.group(2)
        if isinstance(node, MappingNode) and key is not None:
            hit = next(((k, v) for k, v in node.value if getattr(k, "value", None) == key), None)
            if hit is None:
                break
            line, node = hit[0].start_mark.line, hit[1]
        elif isinstance(node, SequenceNode) and index is not None and int(index) < len(node.value):
            node = node.value[int(index)]
            line = node.start_mark.line
        else:
            break
    return "" if line is None else f" (line {line + 1})"


# ------------------------------------------------------------------ pydantic errors


def _unwrap(tp: Any) -> tuple[Any, list[Any]]:
    """Strip ``Annotated`` (collecting its metadata) and ``| None`` from a type."""
    meta: list[Any] = []
    while True:
        if get_origin(tp) is Annotated:
            tp, *extra = get_args(tp)
            for m in extra:  # Field(ge=0) inside a generic stays a FieldInfo
                meta.extend(m.metadata if isinstance(m, FieldInfo) else [m])
        elif get_origin(tp) in (Union, types.UnionType):
            members = [a for a in get_args(tp) if a is not type(None)]
            if len(members) != 1:
                return tp, meta
            tp = members[0]
        else:
            return tp, meta


def _tagged_members(tp: Any) -> dict[str, type[BaseModel]]:
    """``{kind: model}`` when ``tp`` is a union of models tagged by ``kind``."""
    if get_origin(tp) not in (Union, types.UnionType):
        return {}
    members: dict[str, type[BaseModel]] = {}
    for arg in get_args(tp):
        field = getattr(arg, "model_fields", {}).get("kind")
        if field is None:
            return {}
        members[str(field.default)] = arg
    return members


def _step(tp: Any, key: Any) -> tuple[Any, list[Any], bool]:
    """One location step: (next type, its metadata, whether the key is part of the path)."""
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        field = tp.model_fields.get(key) if isinstance(key, str) else None
        if field is None:
            return None, [], True
        inner, meta = _unwrap(field.annotation)
        return inner, [*field.metadata, *meta], True
    tagged = _tagged_members(tp)
    if isinstance(key, str) and key in tagged:
        return tagged[key], [], False
    args = get_args(tp)
    if get_origin(tp) is list and isinstance(key, int) and args:
        return (*_unwrap(args[0]), True)
    if get_origin(tp) is dict and len(args) == 2 and key != "[key]":
        return (*_unwrap(args[1]), True)
    return None, [], True


def _locate(loc: tuple[Any, ...], root: Any = None) -> tuple[str, Any, list[Any]]:
    """Render ``loc`` as ``a.b[1].c`` (tags dropped); also the type and metadata there."""
    tp, meta, path = root or Topology, [], ""
    for key in loc:
        tp, meta, keep = _step(tp, key) if tp is not None else (None, [], True)
        if not keep or key == "[key]":
            continue
        if isinstance(key, int):
            path += f"[{key}]"
        elif re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", str(key)):
            path += f".{key}" if path else str(key)
        else:
            path += f"[{key!r}]"
    return path, tp, meta


def _join(prefix: str, rel: str) -> str:
    if not rel:
        return prefix
    if not prefix or rel.startswith("["):
        return prefix + rel
    return f"{prefix}.{rel}"


def validation_problems(exc: ValidationError, root: type[BaseModel]) -> list[Problem]:
    """(path, message) pairs of a pydantic error on model ``root``, worded like topology errors."""
    return _problems(exc, root)


def _problems(exc: ValidationError, root: Any = None) -> list[Problem]:
    problems: list[Problem] = []
    for err in exc.errors():
        path, tp, meta = _locate(tuple(err["loc"]), root)
        inner = err.get("ctx", {}).get("error")
        if err["type"] == "invalid_key":
            parent = _locate(tuple(err["loc"][:-1]), root)[0]
            found = [(parent, f"unknown key {_show(err['loc'][-1])}; keys are names")]
        elif err["type"] == "union_tag_invalid":
            found = [(_join(path, "kind"), _message(err, tp, meta, root))]
        elif isinstance(inner, FieldProblems):
            found = [(_join(path, rel), msg) for rel, msg in inner.problems]
        else:
            found = [(path, _message(err, tp, meta, root))]
        problems.extend(p for p in found if p not in problems)
    return problems


def _show(value: Any) -> str:
    """A value as the YAML author wrote it, short."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, str):
        return repr(value) if len(value) <= 60 else repr(value[:57] + "...")
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    return f"{type(value).__name__} {value}"


def _expected_number(tp: Any, meta: list[Any], err_type: str) -> str:
    sized = any(m is _SIZE_PARSER for m in meta)
    integral = err_type.startswith("int") or tp is int
    name = "a size" if sized else "an integer" if integral else "a number"
    bounds = {
        type(m).__name__: getattr(m, type(m).__name__.lower())
        for m in meta
        if isinstance(m, (Ge, Gt, Le, Lt))
    }
    if integral and not sized and "Ge" in bounds and "Le" in bounds:
        return f"{name} {bounds['Ge']}-{bounds['Le']}"
    ops = {"Ge": ">=", "Gt": ">", "Le": "<=", "Lt": "<"}
    parts = [f"{ops[k]} {v}" for k, v in bounds.items()]
    return f"{name} {' and '.join(parts)}" if parts else name


_NUMBER_ERRORS = {
    "int_type", "int_parsing", "int_from_float", "float_type", "float_parsing",
    "greater_than", "greater_than_equal", "less_than", "less_than_equal",
}
_SIMPLE = {
    "bool_type": "true or false",
    "list_type": "a list",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
}


def _message(err: ErrorDetails, tp: Any, meta: list[Any], root: Any = None) -> str:
    kind, value, ctx = err["type"], err.get("input"), err.get("ctx", {})
    got = _show(value)
    if kind == "missing":
        return "required key is missing"
    if kind == "extra_forbidden":
        return _unknown_key(err["loc"], root)
    if kind in ("value_error", "assertion_error") and "error" in ctx:
        return str(ctx["error"])
    if kind in _NUMBER_ERRORS:
        # a quoted number is the problem only when the type was refused, not the range
        quoted = kind.endswith(("_type", "_parsing")) and isinstance(value, str) and _numeric(value)
        hint = " (a string: remove the quotes)" if quoted else ""
        return f"expected {_expected_number(tp, meta, kind)}, got {got}{hint}"
    if kind == "string_type":
        hint = " (quote it)" if isinstance(value, (int, float)) else ""
        return f"expected a string, got {got}{hint}"
    if kind in ("literal_error", "union_tag_invalid"):
        expected = str(ctx.get("expected") or ctx.get("expected_tags"))
        return _not_one_of(expected, value, ctx.get("tag"))
    kinds = list(_tagged_members(tp))
    if kinds and kind == "union_tag_not_found" and isinstance(value, dict):
        return f"missing key 'kind'; expected kind one of {', '.join(kinds)}"
    if kinds and kind in (*_SIMPLE, "union_tag_not_found"):
        example = f"{{kind: {kinds[0]}}}"
        return f"expected a mapping with kind one of {', '.join(kinds)} (like {example}), got {got}"
    if kind in _SIMPLE:
        return f"expected {_SIMPLE[kind]}, got {got}"
    if kind == "string_too_short":
        return f"expected a non-empty string, got {got}"
    if kind == "too_short":
        n = ctx.get("min_length")
        return f"expected at least {n} item{'s' if n != 1 else ''}, got {ctx.get('actual_length')}"
    return f"{err['msg'][:1].lower()}{err['msg'][1:]}, got {got}"


def _numeric(text: str) -> bool:
    return re.fullmatch(r"\s*-?\d+(\.\d+)?\s*", text) is not None


def _not_one_of(expected: str, value: Any, tag: Any) -> str:
    got = tag if tag is not None else value
    options = re.findall(r"'([^']*)'", expected)
    close = difflib.get_close_matches(str(got), options, n=1) if isinstance(got, str) else []
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"expected one of {expected}, got {_show(got)}{hint}"


def _unknown_key(loc: tuple[Any, ...], root: Any = None) -> str:
    key = loc[-1] if loc else "?"
    _, parent, _ = _locate(tuple(loc[:-1]), root)
    is_model = isinstance(parent, type) and issubclass(parent, BaseModel)
    known = list(parent.model_fields) if is_model else []
    if isinstance(key, str) and known:
        close = difflib.get_close_matches(key, known, n=1)
        if close:
            return f"unknown key {key!r}; did you mean {close[0]!r}?"
        return f"unknown key {key!r}; expected one of {', '.join(known)}"
    return f"unknown key {_show(key)}"
