"""Loading a run configuration: defaults, then a YAML file, then `key.sub=value` overrides.

Reads: a YAML file of sparse overrides and command-line `key=value` strings.
Writes: nothing. Every value is checked against its field's annotation (`_coerce`); an
unknown key or a wrong type raises `ConfigError` naming the key. `parse_config` stops there:
`offpolicy/runtime/validate.py`'s `load_config` parses and then validates against the
registries. `field_docs` and `reference_rows` read the fields' docstrings back for
`offpolicy config-reference`.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from offpolicy.config.schema import Config
from offpolicy.core.errors import ConfigError


# ---------------------------------------------------------------------------------------------
# Field docs


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of dataclass `cls`, read from its source."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr):
            if isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def reference_rows(cls: type = Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, doc) for every leaf field, for the README's config reference."""
    rows = []
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        default = _default_of(f)
        if dataclasses.is_dataclass(default):
            rows += reference_rows(type(default), key + ".")
        else:
            rows.append((key, repr(default), docs.get(f.name, "")))
    return rows


def _default_of(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


# ---------------------------------------------------------------------------------------------
# Overrides


def parse_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults, then the YAML file's keys, then `key.sub=value` strings, each value checked
    against its field's type (not yet validated across fields or against the registries)."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of config keys at the top level")
        data.pop("ablate", None)  # an ablation file's grid; `train` runs its base config
        apply_dict(cfg, data)
        if not cfg.run.name:
            cfg.run.name = path.stem
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{item}' is not of the form key.sub=value")
        set_key(cfg, key.strip(), yaml.safe_load(value) if value.strip() else "")
    if not cfg.run.name:
        cfg.run.name = "run"
    return cfg


def apply_dict(obj: Any, data: dict, prefix: str = "") -> None:
    """Set nested keys of `data` on dataclass `obj`; unknown keys are errors."""
    for key, value in data.items():
        if isinstance(value, dict) and _is_section(obj, str(key)):
            apply_dict(getattr(obj, key), value, f"{prefix}{key}.")
        else:
            set_key(obj, f"{prefix}{key}", value, root_prefix=prefix)


def set_key(root: Any, dotted: str, value: Any, root_prefix: str = "") -> None:
    """Set `a.b.c = value` on the dataclass tree, coercing to the field's type."""
    parts = dotted[len(root_prefix):].split(".") if root_prefix else dotted.split(".")
    obj = root
    for i, name in enumerate(parts):
        names = [f.name for f in dataclasses.fields(obj)]
        if name not in names:
            where = root_prefix + ".".join(parts[:i]) or "the top level"
            raise ConfigError(
                f"unknown config key '{dotted}'; valid keys in {where}: {', '.join(names)}")
        if i < len(parts) - 1:
            if isinstance(getattr(obj, name), dict):  # free-form dicts: loss.params.cap=2
                _set_nested(getattr(obj, name), parts[i + 1:], value)
                return
            obj = getattr(obj, name)
            if not dataclasses.is_dataclass(obj):
                raise ConfigError(f"config key '{dotted}': '{name}' has no sub-keys")
    f = next(f for f in dataclasses.fields(obj) if f.name == parts[-1])
    if dataclasses.is_dataclass(getattr(obj, f.name)):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{dotted}' is a section; set its sub-keys")
        apply_dict(getattr(obj, f.name), value, dotted + ".")
        return
    hint = typing.get_type_hints(type(obj))[f.name]
    setattr(obj, f.name, _coerce(value, hint, dotted))


def _set_nested(d: dict, keys: list[str], value: Any) -> None:
    for k in keys[:-1]:
        d = d.setdefault(k, {})
    d[keys[-1]] = value


def _is_section(obj: Any, key: str) -> bool:
    return hasattr(obj, key) and dataclasses.is_dataclass(getattr(obj, key))


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check/convert a YAML value to the annotated type; one-line error naming the key."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ConfigError(
                f"{key}: '{value}' is not a valid choice; valid: {', '.join(map(str, choices))}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    expected = origin or hint
    if expected is bool:
        if isinstance(value, bool):
            return value
    elif expected is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif expected is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `1e-3` as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif expected is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif expected in (list, dict):
        if isinstance(value, expected):
            return value
    else:
        return value
    raise ConfigError(f"{key}: expected {expected.__name__}, got {value!r}")
