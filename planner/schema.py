"""One place where user input becomes typed, validated records.

`build(cls, data)` turns nested dicts (from YAML or JSON) into frozen dataclasses:
unknown keys are refused by their dotted name, types are checked, sizes with units
are parsed (`field(metadata={"unit": "bytes"})`), and numbers marked positive are
checked. `to_plain(obj)` is the inverse, for JSON/YAML on disk.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

import yaml

from planner import units
from planner.errors import SpecError

T = TypeVar("T")

# metadata keys understood by build():
#   unit: "bytes" | "bandwidth" | "time" | "flops"  -> parsed with planner.units
#   min:  a number the value must be >= to
#   positive: True -> value must be > 0
UNIT_PARSERS = {
    "bytes": units.parse_bytes,
    "bandwidth": units.parse_bandwidth,
    "time": units.parse_time,
    "flops": units.parse_flops,
}


def _join(prefix: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{prefix}[{key}]"
    return f"{prefix}.{key}" if prefix else key


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        return getattr(origin, "__name__", str(origin))
    return getattr(tp, "__name__", str(tp))


def _convert(tp: Any, value: Any, path: str, meta: Mapping[str, Any]) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, path, meta)
            except SpecError as e:
                errors.append(e)
        raise SpecError(f"expected {_type_name(tp)}, got {value!r}", field=path)
    if origin is typing.Literal:
        if value not in args:
            raise SpecError(f"expected one of {', '.join(repr(a) for a in args)}, got {value!r}", field=path)
        return value
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return build(tp, value, prefix=path)
    if origin in (tuple, list):
        if not isinstance(value, list | tuple):
            raise SpecError(f"expected a list, got {type(value).__name__}", field=path)
        item_tp = args[0] if args else Any
        items = [_convert(item_tp, v, _join(path, i), meta) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise SpecError(f"expected a mapping, got {type(value).__name__}", field=path)
        val_tp = args[1] if len(args) == 2 else Any
        return {str(k): _convert(val_tp, v, _join(path, str(k)), meta) for k, v in value.items()}
    unit = meta.get("unit")
    if unit and tp in (int, float):
        try:
            parsed = UNIT_PARSERS[unit](value)
        except units.UnitError as e:
            raise SpecError(str(e), field=path) from None
        value = int(parsed) if tp is int else float(parsed)
    if tp in (int, float) and isinstance(value, str):
        # YAML 1.1 reads '4.0e9' (no exponent sign) as a string
        try:
            value = float(value) if tp is float or not value.strip().lstrip("-").isdigit() else int(value)
        except ValueError:
            pass
    if tp is bool:
        if not isinstance(value, bool):
            raise SpecError(f"expected true or false, got {value!r}", field=path)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            else:
                raise SpecError(f"expected an integer, got {value!r}", field=path)
        _check_range(value, path, meta)
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise SpecError(f"expected a number, got {value!r}", field=path)
        value = float(value)
        _check_range(value, path, meta)
        return value
    if tp is str:
        if not isinstance(value, str):
            raise SpecError(f"expected a string, got {value!r}", field=path)
        return value
    return value


def _check_range(value: float, path: str, meta: Mapping[str, Any]) -> None:
    if meta.get("positive") and not value > 0:
        raise SpecError(f"must be positive, got {value}", field=path)
    lo = meta.get("min")
    if lo is not None and value < lo:
        raise SpecError(f"must be >= {lo}, got {value}", field=path)
    hi = meta.get("max")
    if hi is not None and value > hi:
        raise SpecError(f"must be <= {hi}, got {value}", field=path)


def build(cls: type[T], data: Any, *, prefix: str = "", source: str | None = None) -> T:
    """A validated `cls` from a mapping; unknown keys are an error naming the dotted key."""
    try:
        if isinstance(data, cls):
            return data
        if not isinstance(data, Mapping):
            raise SpecError(
                f"expected a mapping for {cls.__name__}, got {type(data).__name__}", field=prefix or None
            )
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
        unknown = [k for k in data if k not in fields]
        if unknown:
            from planner.errors import closest_names

            key = str(unknown[0])
            hint = closest_names(key, list(fields), n=1)
            did = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise SpecError(f"unknown key{did}; known keys: {', '.join(fields)}", field=_join(prefix, key))
        kwargs = {}
        for name, f in fields.items():
            path = _join(prefix, name)
            if name not in data:
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                    raise SpecError(f"missing required key (expected {_type_name(hints[name])})", field=path)
                continue
            kwargs[name] = _convert(hints[name], data[name], path, f.metadata)
        obj = cls(**kwargs)
    except SpecError as e:
        raise e.located(source) from None
    except (ValueError, TypeError) as e:
        # __post_init__ checks raise ValueError with their own message
        raise SpecError(str(e), field=prefix or None, source=source) from None
    return obj


def check_bounds(obj: Any) -> None:
    """The `min`/`max`/`positive` metadata of a dataclass's number fields, checked on a built object (for
    objects made in code or from foreign formats such as an HF config.json, not through `build`)."""
    for f in dataclasses.fields(obj):
        meta = f.metadata
        if not ({"min", "max"} & set(meta) or meta.get("positive")):
            continue
        value = getattr(obj, f.name)
        if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
            raise SpecError(f"expected a number, got {value!r}", field=f.name)
        _check_range(value, f.name, meta)


def to_plain(obj: Any) -> Any:
    """Dataclasses, tuples and dicts as JSON-ready plain values."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        # `volatile` fields (wall-clock timings) stay in memory but are not written: the same inputs give
        # the same file, byte for byte
        return {
            f.name: to_plain(getattr(obj, f.name))
            for f in dataclasses.fields(obj)
            if not f.metadata.get("volatile")
        }
    if isinstance(obj, list | tuple):
        return [to_plain(v) for v in obj]
    if isinstance(obj, Mapping):
        return {str(k): to_plain(v) for k, v in obj.items()}
    return obj


def load_mapping(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML or JSON file; a syntax error names the file and the line."""
    p = os.fspath(path)
    try:
        with open(p, encoding="utf-8") as fh:
            text = fh.read()
    except FileNotFoundError:
        raise SpecError("file not found", source=p) from None
    except IsADirectoryError:
        raise SpecError("is a directory, expected a file", source=p) from None
    except UnicodeDecodeError as e:
        raise SpecError(f"not UTF-8 text (byte {e.start}: {e.reason})", source=p) from None
    except OSError as e:
        raise SpecError(f"cannot read: {e.strerror}", source=p) from None
    if p.endswith(".json"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise SpecError(f"malformed JSON: {e.msg} (column {e.colno})", source=p, line=e.lineno) from None
    else:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = mark.line + 1 if mark is not None else None
            problem = getattr(e, "problem", None) or str(e)
            raise SpecError(f"malformed YAML: {problem}", source=p, line=line) from None
    if not isinstance(data, dict):
        raise SpecError(f"expected a mapping at the top level, got {type(data).__name__}", source=p, line=1)
    return data


def check_output_file(path: str, field: str) -> None:
    """A file the user asked to be written: not a directory, and its directory exists (nothing is created
    outside the places the user named)."""
    if os.path.isdir(path):
        raise SpecError("is a directory; expected a file name", field=field, source=path)
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        what = "is not a directory" if os.path.exists(parent) else "does not exist"
        raise SpecError(f"its directory {parent} {what}", field=field, source=path)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write to a temp name in the same directory, fsync, then rename: never half-written."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write to a temp name in the same directory, fsync, then rename: never half-written."""
    p = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(p))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix="-" + os.path.basename(p), dir=directory)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, p)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
