"""Every numeric option of every command has a range, checked before anything is loaded: an out-of-range value on
the command line is a parser error (one line naming the flag, exit code 2, no traceback), and in a YAML config file
an options error naming the file and the key.  The options are found by walking ``build_parser()``, so a numeric
option added later without a range fails here."""

from __future__ import annotations

import argparse
import dataclasses
import math
import subprocess
import sys
import typing

import pytest
import yaml

from elmtune import cli
from elmtune.cli import build_parser, main
from elmtune.options import INT_MAX, Bounded, OptionsError, Range
from elmtune.training.args import DataOptions, TrainOptions

CONFIG_COMMANDS = {("train",): TrainOptions, ("data", "inspect"): DataOptions}  # commands that take --config


def leaf_commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(command words, parser) for every runnable command, groups (`bench`, `data`, …) included."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from leaf_commands(sub, (*path, name)) if any(
                    isinstance(a, argparse._SubParsersAction) for a in sub._actions) else [((*path, name), sub)]


def is_numeric(action: argparse.Action) -> bool:
    default_is_number = isinstance(action.default, (int, float)) and not isinstance(action.default, bool)
    return action.type in (int, float) or isinstance(action.type, Bounded) or default_is_number


COMMANDS = list(leaf_commands(build_parser()))
NUMERIC = [(words, action) for words, sub in COMMANDS for action in sub._actions if is_numeric(action)]
IDS = [f"{' '.join(words)} {action.option_strings[0] if action.option_strings else action.dest}"
       for words, action in NUMERIC]


def bad_values(base: type, bounds: Range) -> list[int | float]:
    """Values just outside each end of ``bounds``, plus what no option accepts: nan and ±inf for floats, ints
    past :data:`INT_MAX` (or the declared maximum) and absurdly large ones."""
    values: list[int | float] = []
    if base is int:
        values += [bounds.minimum - 1] if bounds.minimum is not None else []
        values += [bounds.above] if bounds.above is not None else []
        values += [bounds.maximum + 1 if bounds.maximum is not None else INT_MAX + 1, 10**30, -10**30]
    else:
        if bounds.minimum is not None:
            values += [math.nextafter(float(bounds.minimum), -math.inf), bounds.minimum - 1.0]
        values += [float(bounds.above)] if bounds.above is not None else []
        values += [math.nextafter(float(bounds.maximum), math.inf)] if bounds.maximum is not None else []
        values += [float(bounds.below)] if bounds.below is not None else []
        values += [math.nan, math.inf, -math.inf, -1e308]
    return [v for v in values if v not in bounds.also]


def good_values(base: type, bounds: Range) -> list[int | float]:
    values = [v for v in (bounds.minimum, bounds.maximum) if v is not None] + list(bounds.also)
    values += [INT_MAX] if base is int and bounds.maximum is None and bounds.below is None else []
    return [base(v) for v in values]


@pytest.fixture
def nothing_runs(monkeypatch):
    """Every command's run function replaced by a failure: the checks must all happen while parsing."""
    def ran(args):
        raise AssertionError(f"`{args.command}` ran: an out-of-range value got through the parser")

    for name, (help_text, add, _) in list(cli.COMMANDS.items()):
        monkeypatch.setitem(cli.COMMANDS, name, (help_text, add, ran))


def run(capsys, argv: list[str]) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse
        code = exit_.code
    return code, capsys.readouterr().err


def test_the_walk_finds_the_numeric_options():
    found = set(IDS)
    assert len(COMMANDS) == len(cli.COMMANDS)
    assert {"serve --port", "train --lora-dropout", "generate --top-p", "bench train --steps",
            "data inspect --show", "eval --limit", "demo --seed"} <= found, found


@pytest.mark.parametrize("words, action", NUMERIC, ids=IDS)
def test_every_numeric_option_declares_its_range(words, action):
    assert action.option_strings, "a positional number: extend this test to feed it"
    assert isinstance(action.type, Bounded), (
        f"{' '.join(words)} {action.option_strings[0]} has no range: declare one (opt(..., minimum=…) for a field, "
        "type=bounded(int, lo, hi) for a plain argument)")
    assert action.type.base in (int, float)
    bounds = action.type.range
    assert bounds.minimum is not None or bounds.above is not None, "say the lowest value that makes sense"
    for value in good_values(action.type.base, bounds):
        assert action.type(str(value)) == value
    if action.default not in (None, argparse.SUPPRESS):
        assert action.type(str(action.default)) == action.default, "the default is outside the range"


@pytest.mark.parametrize("words, action", NUMERIC, ids=IDS)
def test_out_of_range_values_are_refused_while_parsing(capsys, nothing_runs, words, action):
    flag = action.option_strings[0]
    values = [repr(v) if isinstance(v, float) else str(v) for v in bad_values(action.type.base, action.type.range)]
    values += ["1e400"] if action.type.base is float else ["1.5"]  # overflows to inf / not an integer
    for value in values:
        code, err = run(capsys, [*words, f"{flag}={value}"])  # --flag=-1: argparse takes -inf for a flag otherwise
        assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, (value, err)
        assert f"argument {flag}" in err and err.startswith(f"elmtune {' '.join(words)}: error:"), (value, err)


def numeric_fields(cls) -> list[tuple[dataclasses.Field, type]]:
    hints = typing.get_type_hints(cls)
    found = []
    for f in dataclasses.fields(cls):
        base = next((t for t in (int, float) if hints[f.name] is t or t in typing.get_args(hints[f.name])), None)
        if base is not None:
            found.append((f, base))
    return found


def test_the_commands_that_read_a_config_file_are_all_walked():
    assert {words for words, sub in COMMANDS if "--config" in sub._option_string_actions} == set(CONFIG_COMMANDS)


YAML_CASES = [(words, f.name, base, f.metadata["range"], value)
              for words, cls in CONFIG_COMMANDS.items() for f, base in numeric_fields(cls)
              for value in bad_values(base, f.metadata["range"])]


@pytest.mark.parametrize("words, key, base, bounds, value", YAML_CASES,
                         ids=[f"{' '.join(c[0])} {c[1]}={c[4]}" for c in YAML_CASES])
def test_out_of_range_values_in_a_config_file_are_refused(capsys, tmp_path, monkeypatch, words, key, base, bounds,
                                                          value):
    import elmtune.tokenizer
    import elmtune.training

    def loaded(*args, **kwargs):
        raise AssertionError("something was loaded before the config file was checked")

    monkeypatch.setattr(elmtune.training, "train", loaded)
    monkeypatch.setattr(elmtune.tokenizer, "load_tokenizer", loaded)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({key: value}))
    code, err = run(capsys, [*words, "-c", str(config)])
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert f"{config}: option {key!r} must be" in err, err


def test_every_numeric_option_field_declares_a_range_with_a_default_inside_it():
    from elmtune.bench import BenchGenerateOptions, BenchTrainOptions
    from elmtune.demo import DemoOptions
    from elmtune.inference import SamplingOptions

    for cls in (TrainOptions, DataOptions, SamplingOptions, DemoOptions, BenchTrainOptions, BenchGenerateOptions):
        for f, _ in numeric_fields(cls):
            bounds = f.metadata.get("range")
            assert bounds is not None, f"{cls.__name__}.{f.name} has no range"
            assert f.default is None or bounds.error(f.default) is None, f"{cls.__name__}.{f.name}'s default"


def test_train_options_built_in_python_are_checked_too():
    with pytest.raises(OptionsError, match="option 'lora_r' must be at least 1, got 0"):
        TrainOptions(lora_r=0)
    with pytest.raises(OptionsError, match="option 'lora_dropout' must be a finite number, got nan"):
        TrainOptions(lora_dropout=math.nan)
    with pytest.raises(OptionsError, match="option 'epochs' must be positive unless 'max_steps' is set"):
        TrainOptions(epochs=0)
    assert TrainOptions(epochs=0, max_steps=5).max_steps == 5


@pytest.mark.parametrize("size", ["0GB", "-5GB", "nanGB", "infGB", "1e400GB", "0.0001KB", "2XB", "GB", "2", ""])
def test_merge_shard_size_is_checked_while_parsing(capsys, nothing_runs, size):
    code, err = run(capsys, ["merge", "adapter", "-o", "out", f"--max-shard-size={size}"])
    assert code == 2 and err.count("\n") == 1 and "argument --max-shard-size" in err, err


@pytest.mark.parametrize("size", ["2GB", "500mb", "1.5GB", "10KB", " 3TB "])
def test_merge_shard_size_accepts_what_huggingface_hub_reads(size):
    from huggingface_hub import split_torch_state_dict_into_shards

    assert cli._shard_size(size) == size.strip()
    split_torch_state_dict_into_shards({}, max_shard_size=size.strip())  # the same string is valid there


def test_serve_port_99999_is_one_line_in_a_real_process():
    out = subprocess.run([sys.executable, "-m", "elmtune.cli", "serve", "--port", "99999"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2 and out.stdout == "", out
    assert out.stderr == ("elmtune serve: error: argument --port: must be between 1 and 65535, got 99999 "
                          "(see elmtune serve --help)\n")
