"""Run options as dataclasses: one definition feeds the CLI flags, the YAML file and the resolved config.

Each field carries its help text (``opt(default, "help")``). Precedence is decided here and only here:
command-line flags > YAML file (``--config``) > the dataclass defaults.  Unknown YAML keys and values of the
wrong type are refused with the file and key named.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any

import yaml


class OptionsError(ValueError):
    """A bad option value, flag or config-file entry; the message names where it came from."""


def opt(default: Any, help: str, *, choices: tuple | None = None, flag: str | None = None, short: str | None = None):
    """A dataclass field with help text (and optional choices) for the CLI and the docs."""
    meta = {"help": help, "choices": choices, "flag": flag, "short": short}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _base_type(annotation: Any) -> tuple[type, bool, bool]:
    """(scalar type, is_list, optional) for annotations like ``int``, ``str | None``, ``list[str]``."""
    optional = False
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(args) < len(typing.get_args(annotation))
        annotation = args[0] if len(args) == 1 else str  # e.g. "int | float | str": parsed by the field itself
        origin = typing.get_origin(annotation)
    if origin is list:
        return typing.get_args(annotation)[0], True, optional
    return annotation, False, optional


def _fields(cls) -> list[tuple[dataclasses.Field, type, bool, bool]]:
    hints = typing.get_type_hints(cls)
    return [(f, *_base_type(hints[f.name])) for f in dataclasses.fields(cls)]


def flag_name(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser, cls, *, include: set[str] | None = None) -> None:
    """Add one flag per field of ``cls``; unset flags stay absent from the namespace (so YAML can fill them)."""
    for f, base, is_list, _ in _fields(cls):
        if include is not None and f.name not in include:
            continue
        names = [flag_name(f)] + ([f.metadata["short"]] if f.metadata.get("short") else [])
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        help_text = f.metadata.get("help", "")
        if default not in (None, [], ""):
            help_text += f" (default: {default})"
        kwargs: dict[str, Any] = dict(dest=f.name, default=argparse.SUPPRESS, help=help_text)
        if base is bool and not is_list:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["metavar"] = f.name.upper().split("_")[-1]
            if f.metadata.get("choices"):
                kwargs["choices"] = f.metadata["choices"]
                kwargs["metavar"] = "{" + ",".join(map(str, f.metadata["choices"])) + "}"
            if is_list:
                kwargs["action"] = "append"
            kwargs["type"] = base if base in (int, float) else str
        parser.add_argument(*names, **kwargs)


def _coerce(value: Any, base: type, is_list: bool, optional: bool, where: str, choices: tuple | None) -> Any:
    if value is None:
        if optional:
            return None
        raise OptionsError(f"{where}: a value is required")
    if is_list:
        items = value if isinstance(value, list) else [value]
        return [_coerce(v, base, False, False, where, choices) for v in items]
    if base is bool:
        if not isinstance(value, bool):
            raise OptionsError(f"{where}: expected true or false, got {value!r}")
    elif base is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise OptionsError(f"{where}: expected an integer, got {value!r}")
    elif base is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise OptionsError(f"{where}: expected a number, got {value!r}")
        value = float(value)
    elif base is str:
        if isinstance(value, bool) and choices and {"on", "off"} <= set(choices):
            value = "on" if value else "off"  # YAML reads an unquoted on/off (or true/false) as a boolean
        if isinstance(value, (dict, list, bool)):
            raise OptionsError(f"{where}: expected a string, got {value!r}")
        value = str(value)
    if choices and value not in choices:
        raise OptionsError(f"{where}: {value!r} is not one of {', '.join(map(str, choices))}")
    return value


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise OptionsError(f"{path}: config file not found") from None
    except UnicodeDecodeError as e:
        raise OptionsError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise OptionsError(f"{path}: invalid YAML{where}: {getattr(e, 'problem', e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise OptionsError(f"{path}: expected a mapping of option: value, got {type(data).__name__}")
    return data


def resolve(cls, *, yaml_path: str | Path | None = None, flags: dict | None = None, **overrides):
    """Build ``cls`` from defaults < YAML file < flags (< keyword overrides, for Python callers)."""
    fields = {f.name: (f, base, is_list, optional) for f, base, is_list, optional in _fields(cls)}
    values: dict[str, Any] = {}
    sources: list[tuple[str, dict]] = []
    if yaml_path:
        sources.append((str(yaml_path), read_yaml(yaml_path)))
    sources.append(("command line", flags or {}))
    sources.append(("arguments", overrides))
    for origin, data in sources:
        for key, value in data.items():
            name = key.replace("-", "_")
            if name not in fields:
                close = difflib.get_close_matches(name, fields, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise OptionsError(f"{origin}: unknown option {key!r}{hint}")
            f, base, is_list, optional = fields[name]
            where = f"{origin}: option {key!r}" if origin != "command line" else flag_name(f)
            values[name] = _coerce(value, base, is_list, optional, where, f.metadata.get("choices"))
    return cls(**values)


def to_dict(options) -> dict:
    return dataclasses.asdict(options)


def write_yaml(options, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(options), sort_keys=False, allow_unicode=True), encoding="utf-8")
