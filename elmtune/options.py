"""Run options as dataclasses: one definition feeds the CLI flags, the YAML file and the resolved config.

Each field carries its help text (``opt(default, "help")``). Precedence is decided here and only here:
command-line flags > YAML file (``--config``) > the dataclass defaults.  Unknown YAML keys and values of the
wrong type are refused with the file and key named, and so are numbers outside an option's declared range
(``opt(..., minimum=1)``): the same check is the flag's argparse type, so a bad flag fails while parsing.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml


class OptionsError(ValueError):
    """A bad option value, flag or config-file entry; the message names where it came from."""


# Integers go on to tensor shapes, C libraries and sockets: one without its own maximum must fit a signed 32-bit
# int, so that an absurd value is refused here rather than overflowing somewhere deep in a run.
INT_MAX = 2**31 - 1
# transformers' set_seed hands the seed to numpy, which takes 0 ≤ seed < 2**32.
SEED_MAX = 2**32 - 1


@dataclasses.dataclass(frozen=True)
class Range:
    """The values a numeric option accepts: ``minimum``/``maximum`` are inclusive ends, ``above``/``below``
    exclusive ones, ``also`` lists sentinels outside them (``-1``: no limit).  Floats must be finite and ints
    without a maximum at most :data:`INT_MAX`."""

    minimum: float | None = None
    maximum: float | None = None
    above: float | None = None
    below: float | None = None
    also: tuple = ()

    def __str__(self) -> str:
        """The range in words, as the help text and the errors say it: "at least 1", "in (0, 1]", …"""
        low = f"[{self.minimum}" if self.minimum is not None else f"({self.above}" if self.above is not None else ""
        high = f"{self.maximum}]" if self.maximum is not None else f"{self.below})" if self.below is not None else ""
        if self.minimum is not None and self.maximum is not None:
            text = f"between {self.minimum} and {self.maximum}"
        elif low and high:
            text = f"in {low}, {high}"
        elif low:
            text = f"at least {self.minimum}" if self.minimum is not None else f"above {self.above}"
        elif high:
            text = f"at most {self.maximum}" if self.maximum is not None else f"below {self.below}"
        else:
            text = "any finite number"
        return " or ".join([*map(str, self.also), text])

    def error(self, value: int | float) -> str | None:
        """Why ``value`` is refused (``"must be …, got …"``), or None when it is accepted."""
        if value in self.also:
            return None
        if isinstance(value, float) and not math.isfinite(value):
            return f"must be a finite number, got {value}"
        if isinstance(value, int) and self.maximum is None and self.below is None and value > INT_MAX:
            return f"must be at most {INT_MAX}, got {value}"
        inside = ((self.minimum is None or value >= self.minimum) and (self.above is None or value > self.above)
                  and (self.maximum is None or value <= self.maximum) and (self.below is None or value < self.below))
        return None if inside else f"must be {self}, got {value}"


class Bounded:
    """An argparse ``type``: parse with ``base`` (``int``/``float``), then check ``range``, so that an
    out-of-range flag is a parser error naming the flag."""

    def __init__(self, base: type, bounds: Range):
        self.base, self.range = base, bounds
        self.__name__ = base.__name__  # argparse's "invalid int value: 'x'" for what ``base`` cannot parse

    def __call__(self, text: str) -> int | float:
        value = self.base(text)
        problem = self.range.error(value)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value

    def __repr__(self) -> str:
        return f"{self.__name__} {self.range}"


def bounded(base: type, minimum: float | None = None, maximum: float | None = None, *, above: float | None = None,
            below: float | None = None, also: tuple = ()) -> Bounded:
    """An argparse ``type`` for a plain numeric argument, e.g. ``type=bounded(int, 1, 65535)``."""
    return Bounded(base, Range(minimum, maximum, above, below, also))


def opt(default: Any, help: str, *, choices: tuple | None = None, flag: str | None = None, short: str | None = None,
        minimum: float | None = None, maximum: float | None = None, above: float | None = None,
        below: float | None = None, also: tuple = ()):
    """A dataclass field with help text (and optional choices, or a numeric range) for the CLI and the docs."""
    bounds = (minimum, maximum, above, below)
    meta = {"help": help, "choices": choices, "flag": flag, "short": short,
            "range": Range(*bounds, also=also) if any(b is not None for b in bounds) else None}
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
        bounds = f.metadata.get("range")
        notes = ([str(bounds)] if bounds else []) + ([f"default: {default}"] if default not in (None, [], "") else [])
        if notes:
            help_text += f" ({'; '.join(notes)})"
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
            kwargs["type"] = (Bounded(base, bounds) if bounds else base) if base in (int, float) else str
        parser.add_argument(*names, **kwargs)


def _coerce(value: Any, base: type, is_list: bool, optional: bool, where: str, choices: tuple | None,
            bounds: Range | None = None) -> Any:
    if value is None:
        if optional:
            return None
        raise OptionsError(f"{where}: a value is required")
    if is_list:
        items = value if isinstance(value, list) else [value]
        return [_coerce(v, base, False, False, where, choices, bounds) for v in items]
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
    if bounds and base in (int, float) and (problem := bounds.error(value)):
        raise OptionsError(f"{where} {problem}")
    return value


def check_ranges(options) -> None:
    """Refuse an options object built in Python (not through :func:`resolve`) with a number out of its range."""
    for f in dataclasses.fields(options):
        bounds, value = f.metadata.get("range"), getattr(options, f.name)
        if bounds is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if problem := bounds.error(value):
            raise OptionsError(f"option {f.name!r} {problem}")


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


def resolve(cls, *, yaml_path: str | Path | None = None, flags: dict | None = None, yaml_ignore: Iterable[str] = (),
            **overrides):
    """Build ``cls`` from defaults < YAML file < flags (< keyword overrides, for Python callers).

    ``yaml_ignore``: YAML keys to skip, for a command that reads only part of a wider config file."""
    fields = {f.name: (f, base, is_list, optional) for f, base, is_list, optional in _fields(cls)}
    values: dict[str, Any] = {}
    sources: list[tuple[str, dict]] = []
    if yaml_path:
        skip = set(yaml_ignore)
        config = read_yaml(yaml_path)
        sources.append((str(yaml_path), {k: v for k, v in config.items() if str(k).replace("-", "_") not in skip}))
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
            values[name] = _coerce(value, base, is_list, optional, where, f.metadata.get("choices"),
                                   f.metadata.get("range"))
    return cls(**values)


def to_dict(options) -> dict:
    return dataclasses.asdict(options)


def write_yaml(options, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(options), sort_keys=False, allow_unicode=True), encoding="utf-8")
