"""The ``elmtune`` command line: a thin table of command → plain function (everything is callable from Python)."""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable

from huggingface_hub.errors import StrictDataclassError

from . import __version__


class UsageError(Exception):
    """A problem with what the user asked for: printed as one line, exit code 2."""


def info(model: str) -> dict:
    """Architecture and parameter counts of a preset or checkpoint, computed on the meta device."""
    from .models.loading import build_on_meta, load_config

    config = load_config(model)
    net = build_on_meta(config)
    return {
        "model": model,
        "layers": config.num_transformer_layers,
        "model_dim": config.model_dim,
        "head_dim": config.head_dim,
        "query_heads": config.num_query_heads,
        "kv_heads": config.num_kv_heads,
        "ffn_dims": [config.ffn_dim(i) for i in range(config.num_transformer_layers)],
        "vocab_size": config.vocab_size,
        "tied_embeddings": config.share_input_output_layers,
        "parameters": sum(p.numel() for p in net.parameters()),
    }


def _info_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a preset (openelm-270m, openelm-450m, openelm-1.1b, openelm-3b) or a checkpoint "
                                 "directory in Apple's layout")


def _print_info(args: argparse.Namespace) -> int:
    for key, value in info(args.model).items():
        print(f"{key:>15}: {value:,}" if isinstance(value, int) and not isinstance(value, bool) else f"{key:>15}: {value}")
    return 0


def _options_from(args: argparse.Namespace, cls):
    from .options import resolve

    flags = {k: v for k, v in vars(args).items() if k not in ("command", "run", "debug", "config", "show", "output")}
    return resolve(cls, yaml_path=getattr(args, "config", None), flags=flags)


def _train_parser(p: argparse.ArgumentParser) -> None:
    from .options import add_arguments
    from .train.args import TrainOptions

    p.add_argument("--config", "-c", metavar="YAML", help="options from a YAML file (keys = option names); "
                                                            "flags given here override it")
    add_arguments(p, TrainOptions)


def _run_train(args: argparse.Namespace) -> int:
    import json

    from .train import TrainOptions, train

    summary = train(_options_from(args, TrainOptions))
    if "output_dir" not in summary:  # a dry run: the plan
        for key, value in summary.items():
            print(f"{key:>22}: {json.dumps(value) if isinstance(value, dict) else f'{value:,}' if isinstance(value, int) else value}")
        return 0
    print(f"adapter written to {summary['output_dir']} after {summary['global_step']} steps"
          + (f"; loss {summary['first_loss']:.4f} → {summary['last_loss']:.4f}" if "last_loss" in summary else "")
          + (f"; eval loss {summary['eval_loss']:.4f}" if "eval_loss" in summary else ""))
    return 0


def _inspect_parser(p: argparse.ArgumentParser) -> None:
    from .options import add_arguments
    from .train.args import DataOptions

    p.add_argument("--config", "-c", metavar="YAML", help="read these options from a YAML file (e.g. a training "
                                                            "config; keys that are not data options are ignored)")
    add_arguments(p, DataOptions)
    p.add_argument("--show", type=int, default=3, metavar="N", help="examples to print (default: 3)")
    p.add_argument("--output", metavar="FILE.jsonl", help="write every kept example (file, index, input_ids, "
                                                           "attention_mask, labels) to this JSONL file")


def _run_inspect(args: argparse.Namespace) -> int:
    from .data import DataSpec
    from .data.inspect import inspect_data
    from .options import read_yaml, resolve
    from .tokenizer import load_tokenizer
    from .train.args import DataOptions, TrainOptions

    flags = {k: v for k, v in vars(args).items() if k in DataOptions.__dataclass_fields__}
    yaml_values = read_yaml(args.config) if args.config else {}
    train_only = set(TrainOptions.__dataclass_fields__) - set(DataOptions.__dataclass_fields__)
    options = resolve(DataOptions, flags={**{k: v for k, v in yaml_values.items() if k not in train_only}, **flags})
    if not options.data:
        raise UsageError("no --data given")
    if not options.tokenizer:
        raise UsageError("no --tokenizer given")
    spec = DataSpec.parse(options.template, options.fields, options.max_length)
    inspect_data(options.data, load_tokenizer(options.tokenizer), spec, options.on_bad_record, args.show, args.output)
    return 0


def _demo_parser(p: argparse.ArgumentParser) -> None:
    from .demo import DemoOptions
    from .options import add_arguments

    add_arguments(p, DemoOptions)


def _run_demo(args: argparse.Namespace) -> int:
    from .demo import DemoOptions, run_demo

    run_demo(_options_from(args, DemoOptions))
    return 0


# command → (one-line help, add arguments, run). New commands register here and nowhere else.
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {
    "demo": ("the whole pipeline offline in minutes: generated task, tiny OpenELM, LoRA training, accuracy "
             "before/after", _demo_parser, _run_demo),
    "train": ("LoRA fine-tune an OpenELM model on instruction data", _train_parser, _run_train),
    "data inspect": ("show what training will see: rendered examples, supervised tokens, statistics",
                     _inspect_parser, _run_inspect),
    "info": ("show an OpenELM architecture and its parameter count (no weights loaded)", _info_parser, _print_info),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="elmtune",
        description="Fine-tune Apple's OpenELM models with LoRA, and run what comes out of it.",
    )
    parser.add_argument("--version", action="version", version=f"elmtune {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    groups: dict[str, argparse._SubParsersAction] = {}
    for name, (help_text, add_arguments, run) in COMMANDS.items():
        group, _, leaf = name.rpartition(" ")
        if group and group not in groups:
            groups[group] = sub.add_parser(group, help=f"{group} commands").add_subparsers(dest="subcommand",
                                                                                       metavar="SUBCOMMAND", required=True)
        command = (groups[group] if group else sub).add_parser(leaf, help=help_text, description=help_text)
        add_arguments(command)
        command.set_defaults(run=run, command=name)
    return parser


def main(argv: list[str] | None = None) -> int:
    warnings.filterwarnings("ignore", category=FutureWarning)  # library deprecation notes are not for users
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.run(args)
    except (UsageError, ValueError, OSError, StrictDataclassError) as error:
        if args.debug:
            raise
        print(f"elmtune {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
