"""A Config from YAML and dotted key=value overrides: each value coerced to its field's type (a wrong key
or type is one line naming it), `~` expanded in paths, then validated; and back to a dict for the run
directory, wandb and `dcgan train --help`'s list of keys.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from dcgan.config.sections import Config, validate
from dcgan.config.vocabulary import ConfigError
from dcgan.files import write_text_atomically


def _optional(tp: Any) -> Any:
    """T for a declared `T | None` (a key that may be null: unset), else None."""
    if get_origin(tp) in (typing.Union, types.UnionType):
        rest = [a for a in get_args(tp) if a is not type(None)]
        if len(rest) == 1 and len(get_args(tp)) == 2:
            return rest[0]
    return None


def _describe(tp: Any) -> str:
    if (inner := _optional(tp)) is not None:
        return f"{_describe(inner)} or null"
    if get_origin(tp) is Literal:
        return " | ".join(str(a) for a in get_args(tp))
    if get_origin(tp) is tuple:
        return "a list of strings"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check `value` against the declared type `tp`, converting only where nothing can be lost."""
    if (inner := _optional(tp)) is not None:
        if value is None or value == "":  # YAML null (~), or `key=` on the command line: unset
            return None
        try:
            return _coerce(key, value, inner)
        except ConfigError:
            raise ConfigError(f"{key}: expected {_describe(tp)}, got {value!r}") from None
    if get_origin(tp) is Literal:
        if value in get_args(tp):
            return value
    elif get_origin(tp) is tuple:
        if isinstance(value, str):
            return tuple(v.strip() for v in value.split(",") if v.strip())
        if isinstance(value, (list, tuple)) and all(isinstance(v, (str, int, float)) for v in value):
            return tuple(str(v) for v in value)
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if value is None:
            return ""
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    raise ConfigError(f"{key}: expected {_describe(tp)}, got {value!r}")


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        key = f"{prefix}{name}"
        if name not in known:
            raise ConfigError(f"unknown key '{key}' (allowed here: {', '.join(sorted(known))})")
        tp = hints[name]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{key}: expected a section of keys, got {value!r}")
            kwargs[name] = _build(tp, value, f"{key}.")
        else:
            kwargs[name] = _coerce(key, value, tp)
    return cls(**kwargs)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    *parents, leaf = dotted.split(".")
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{dotted}: '{part}' is a value, not a section")
        node = child
    node[leaf] = value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn `["train.steps=10", "log.tags=[a,b]"]` into a nested dict; values are parsed as YAML."""
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{item}' must look like key=value, e.g. train.steps=1000")
        _set_dotted(tree, key.strip(), yaml.safe_load(raw) if raw.strip() else "")
    return tree


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def config_from_dict(data: dict[str, Any]) -> Config:
    """Build and validate a Config from nested plain data (as read from YAML)."""
    config = _expand_home(_build(Config, data, ""))
    validate(config)
    return config


def _expand_home(config: Config) -> Config:
    """`~/runs/x` means the home directory, as in a shell (a YAML value or an override is not expanded
    by one): without this, run.dir=~/x creates a directory literally named '~'."""

    def expand(path: str) -> str:
        return os.path.expanduser(path) if path.startswith("~") else path

    return dataclasses.replace(
        config,
        run=dataclasses.replace(config.run, dir=expand(config.run.dir)),
        data=dataclasses.replace(config.data, shards=expand(config.data.shards)),
        eval=dataclasses.replace(config.eval, data=expand(config.eval.data), inception=expand(config.eval.inception)),
    )


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or start from defaults when `path` is None) and apply dotted overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        data = loaded or {}
    return config_from_dict(_merge(data, parse_overrides(overrides or [])))


def config_to_dict(config: Config) -> dict[str, Any]:
    """Plain nested data (tuples as lists) suitable for YAML, JSON and wandb."""

    def plain(value: Any) -> Any:
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(config))


def save_config(config: Config, path: str | Path) -> None:
    write_text_atomically(Path(path), yaml.safe_dump(config_to_dict(config), sort_keys=False))


def iter_keys(cls: type = Config, prefix: str = "") -> typing.Iterator[tuple[str, Any, Any, str]]:
    """(dotted key, type, default, help) for every leaf key, in declaration order."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            yield from iter_keys(tp, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", tp, f.default, f.metadata.get("help", "")


def keys_help() -> str:
    """The table of config keys printed by `dcgan train --help`."""
    rows = [
        f"  {key:<26} {_describe(tp):<24} default {'null' if default is None else repr(default)}\n      {help}"
        for key, tp, default, help in iter_keys()
    ]
    return "config keys (set in YAML or as key=value):\n" + "\n".join(rows)


def replace(config: Config, **sections: Any) -> Config:
    """`dataclasses.replace` for nested sections: replace(cfg, train={"steps": 5})."""
    changes = {
        name: dataclasses.replace(getattr(config, name), **value) if isinstance(value, dict) else value
        for name, value in sections.items()
    }
    new = dataclasses.replace(config, **changes)
    validate(new)
    return new
