"""The ``elmtune`` command line: a thin table of command → plain function (everything is callable from Python)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

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


# command → (one-line help, add arguments, run). New commands register here and nowhere else.
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {
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
    for name, (help_text, add_arguments, run) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        add_arguments(command)
        command.set_defaults(run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.run(args)
    except (UsageError, ValueError, OSError) as error:
        if args.debug:
            raise
        print(f"elmtune {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
