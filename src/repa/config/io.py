"""Typed (de)serialisation of `Config`: YAML presets with `base:`, dotted overrides, unknown keys answered with
suggestions, and the resolved config written to the run directory."""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from repa.config.schema import Config
from repa.config.validate import ConfigError
from repa.fileio import write_text_atomic


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp` (converting only where lossless), or raise ValueError."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ValueError:
                continue
        raise ConfigError(f"{key}: {value!r} is not a valid {_type_name(tp)}")
    if origin is Literal:
        if isinstance(value, bool) and "no" in args and not value:  # YAML 1.1 reads a bare `no` as false
            value = "no"
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            if origin is list and isinstance(value, str):
                value = [v for v in value.split(",") if v]  # `repa.encoders=a,b` on the command line
            else:
                raise ConfigError(f"{key}: expected a list, got {value!r}")
        if origin is list:
            return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `3e-4` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {tp}")


def _from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1) if isinstance(key, str) else []
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f" (valid: {', '.join(names)})"
            raise ConfigError(f"unknown config key '{full}'{hint}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _from_dict(tp, {} if value is None else value, f"{full}.")
        else:
            kwargs[key] = _coerce(value, tp, full)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (tuples as lists), suitable for YAML/JSON."""
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            v = to_dict(v)
        elif isinstance(v, tuple):
            v = list(v)
        out[f.name] = v
    return out


def from_dict(data: dict[str, Any]) -> Config:
    """Build and validate a Config from a nested dict holding only the keys that differ from the defaults."""
    return _from_dict(Config, data)


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`["train.max_steps=200", "repa.encoders=[a,b]"]` -> nested dict; values are parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like section.key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) < 2 or not all(parts):
            raise ConfigError(f"override '{item}': key must be dotted, e.g. train.max_steps=200")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"override '{item}': {_yaml_problem(err)}") from err
        node = out
        for i, p in enumerate(parts[:-1]):
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}' conflicts with the earlier '{'.'.join(parts[: i + 1])}=...'")
        node[parts[-1]] = value
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- YAML preset (safe-loaded; may name a `base:` preset beside it) <- dotted overrides."""
    data = load_yaml(Path(path)) if path is not None else {}
    return from_dict(_merge(data, parse_overrides(overrides or [])))


def load_yaml(path: Path, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a preset; `base: other.yaml` (relative to the file) is loaded first and updated by the rest."""
    if not path.is_file():
        of = f" (the base: of {_chain[-1]})" if _chain else ""
        raise FileNotFoundError(f"config file not found: {path}{of}")
    data = _read_yaml(path)
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str) or not base.strip():
        raise ConfigError(f"{path}: base: must name a preset file relative to it (e.g. base: sit-b2.yaml), "
                          f"got {base!r}")  # fmt: skip
    chain, base_path = (*_chain, path), path.parent / base
    if any(os.path.realpath(base_path) == os.path.realpath(p) for p in chain):
        cycle = " -> ".join(str(p) for p in (*chain, base_path))
        raise ConfigError(f"{path}: base: {base} makes a cycle ({cycle}); a preset cannot be its own base")
    return _merge(load_yaml(base_path, chain), data)


def _read_yaml(path: Path) -> dict[str, Any]:
    """A preset's mapping (safe-loaded), or a ConfigError naming the file: not UTF-8, not YAML, a refused tag."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path} is not UTF-8 text (byte 0x{raw[err.start]:02x} at offset {err.start}): "
                          "save it as UTF-8") from err  # fmt: skip
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: {_yaml_problem(err)}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must hold a mapping of sections")
    return data


def _yaml_problem(err: yaml.YAMLError) -> str:
    """One line for a YAML error: where and what (PyYAML's own text spans several lines)."""
    mark = getattr(err, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem = getattr(err, "problem", None) or " ".join(line.strip() for line in str(err).splitlines())
    if isinstance(err, yaml.reader.ReaderError):  # its text names "<unicode string>", not the file
        where, problem = f" at character {err.position}", f"unacceptable character #x{err.character:04x}"
    if isinstance(err, yaml.constructor.ConstructorError):
        return (f"refused YAML{where}: {problem}; configs are plain YAML (mappings, lists, numbers, strings) and "
                "tags such as !!python/... are never constructed")  # fmt: skip
    return f"not valid YAML{where}: {problem}"


def dump_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (safe dump: plain types only), atomically (temporary file + rename)."""
    write_text_atomic(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
