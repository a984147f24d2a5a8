"""Untrusted YAML → typed, frozen dataclasses, with every problem reported at once.

Target profiles, calibration presets and recipes come from files people edit by hand. A typo must
not be silently ignored and must not surface as a TypeError three stages later, so loading checks
unknown keys (with a did-you-mean), types, allowed values and ranges, and raises one UsageError
that lists them all with their dotted field names. YAML is parsed with `safe_load`, within a size
bound, and anchors/aliases are refused (they buy nothing in a profile and enable alias bombs).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import stat
import types
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from .errors import EdgeTransferError, UsageError

MAX_YAML_BYTES = 256 * 1024
MAX_YAML_DEPTH = 32  # a profile or recipe is 3-4 levels deep
#: a number YAML 1.1 leaves as a string (``1e-4``: an exponent without a dot)
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
T = TypeVar("T")


def read_yaml(path: str | Path) -> dict[str, Any]:
    """`yaml.safe_load` a mapping from `path`, refusing huge files, aliases and non-mapping documents."""
    path = Path(path)
    try:
        mode = path.stat()
    except FileNotFoundError as exc:
        raise UsageError("file not found", path=path) from exc
    if not stat.S_ISREG(mode.st_mode):  # a FIFO or device would block the read, a folder fail it
        raise UsageError("not a regular file", path=path)
    size = mode.st_size
    if size > MAX_YAML_BYTES:
        raise UsageError(f"file is {size} bytes; configuration files are limited to {MAX_YAML_BYTES}", path=path)
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"not UTF-8 text ({exc})", path=path) from exc
    try:
        depth = 0  # events, not the recursive constructor: refused at the first level too deep
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.AliasEvent):
                raise UsageError("YAML anchors/aliases are not allowed in configuration files", path=path)
            if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
                depth += 1
                if depth > MAX_YAML_DEPTH:
                    raise UsageError(f"nested more than {MAX_YAML_DEPTH} levels deep", path=path)
            elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
                depth -= 1
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise UsageError(f"not valid YAML: {exc}", path=path) from exc
    if not isinstance(data, dict):
        raise UsageError(f"expected a mapping at the top level, got {type(data).__name__}", path=path)
    return data


def _describe(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, where: str, errors: list[str]) -> Any:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        inner = [o for o in options if o is not type(None)]
        if len(inner) == 1:
            return _convert(value, inner[0], where, errors)
        raise TypeError("only Optional unions are supported")
    if origin is Literal:
        if value not in get_args(tp):
            hint = difflib.get_close_matches(str(value), [str(a) for a in get_args(tp)], n=1)
            errors.append(f"{where}: {value!r} is not one of {_describe(tp)}" + (f" (did you mean {hint[0]!r}?)" if hint else ""))
        return value
    if origin in (tuple, list):
        if not isinstance(value, list):
            errors.append(f"{where}: expected a list, got {type(value).__name__}")
            return ()
        (item_tp, *_rest) = get_args(tp) or (Any,)
        return tuple(_convert(v, item_tp, f"{where}[{i}]", errors) for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where, errors)
    if tp is Any:
        return value
    if tp is float:
        if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads 1e-4 (no dot) as a string; the user meant the number
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            errors.append(f"{where}: expected a number, got {value!r}")
            return 0.0
        return float(value)
    if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        errors.append(f"{where}: expected an integer, got {value!r}")
        return 0
    if tp in (str, bool) and not isinstance(value, tp):
        errors.append(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


class _Invalid:
    """Stands in for a field that failed to convert (or is missing), so that the cross-field checks
    (`problems()`) on the other fields still run and every problem is reported at once: every
    comparison with it is False and it is falsy, so a check that reads it does not fire."""

    __slots__ = ()

    def __eq__(self, other: object) -> bool:
        return False

    __ne__ = __lt__ = __le__ = __gt__ = __ge__ = __eq__

    def __bool__(self) -> bool:
        return False

    def __hash__(self) -> int:
        return 0

    def __getattr__(self, name: str) -> _Invalid:
        if name.startswith("__"):
            raise AttributeError(name)
        return self

    def __repr__(self) -> str:
        return "<invalid>"


_INVALID = _Invalid()


def _is_literal(tp: Any) -> bool:
    if get_origin(tp) in (Union, types.UnionType):
        inner = [o for o in get_args(tp) if o is not type(None)]
        return len(inner) == 1 and _is_literal(inner[0])
    return get_origin(tp) is Literal


def _build(cls: type[T], data: Any, where: str, errors: list[str]) -> T:
    if not isinstance(data, dict):
        errors.append(f"{where or 'document'}: expected a mapping, got {type(data).__name__}")
        return _INVALID  # type: ignore[return-value]
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    aliases: dict[str, str] = getattr(cls, "ALIASES", {})  # other tools' names for a field
    for key in data:
        if key not in fields:
            hint = difflib.get_close_matches(str(key), list(fields), n=1)
            if not hint and (near := difflib.get_close_matches(str(key), list(aliases), n=1)):
                hint = [aliases[near[0]]]
            errors.append(f"{where + '.' if where else ''}{key}: unknown key"
                          + (f" (did you mean {hint[0]!r}?)" if hint else f"; known: {', '.join(fields)}"))
    # Fields that fail are replaced by _INVALID (an invalid choice keeps the value the file gave, which
    # the cross-field checks may compare), so `problems()` still reports what the other fields break.
    failed: set[str] = set()
    kwargs = {}
    for name, f in fields.items():
        path = f"{where}.{name}" if where else name
        if name in data:
            before = len(errors)
            value = _convert(data[name], hints[name], path, errors)
            if len(errors) > before and not dataclasses.is_dataclass(value):
                failed.add(name)
                if not _is_literal(hints[name]):
                    value = _INVALID
            kwargs[name] = value
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            errors.append(f"{path}: required")
            failed.add(name)
            kwargs[name] = _INVALID
    try:
        obj = cls(**kwargs)
    except EdgeTransferError as exc:  # the class's own checks (they skip fields refused above), each listed
        listed = getattr(exc, "problems", None) or [f"{exc.field}: {str(exc).removeprefix(f'field {exc.field!r}: ')}"
                                                    if exc.field else str(exc)]
        errors.extend(f"{where + '.' if where else ''}{problem}" for problem in listed)
        return _INVALID  # type: ignore[return-value]
    except (TypeError, ValueError) as exc:
        if not failed:
            errors.append(f"{where or 'document'}: {exc}")
        return _INVALID  # type: ignore[return-value]
    try:
        problems = getattr(obj, "problems", lambda: [])()
    except Exception:
        if not failed:
            raise
        problems = []  # a check tripped over an invalid field: that field's own error is reported
    for problem in problems:
        if failed and set(problem.split(":", 1)[0].split("/")) & failed:
            continue  # about a field whose own error is already listed
        errors.append(f"{where + '.' if where else ''}{problem}")
    return _INVALID if failed else obj  # type: ignore[return-value]


def from_dict(cls: type[T], data: Any, *, source: str | Path | None = None) -> T:
    """Build `cls` from `data`; one UsageError listing every problem, each with its dotted field."""
    errors: list[str] = []
    obj = _build(cls, data, "", errors)
    if errors:
        raise UsageError("invalid configuration:\n  - " + "\n  - ".join(errors), path=source)
    return obj


def to_dict(obj: Any) -> Any:
    """A dataclass back to plain YAML/JSON-able data (tuples become lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (tuple, list)):
        return [to_dict(v) for v in obj]
    return obj


__all__ = ["from_dict", "read_yaml", "to_dict"]
