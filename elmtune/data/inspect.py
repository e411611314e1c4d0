"""``elmtune data inspect``: what exactly will the model be trained on?

Shows a few examples rendered token by token with the supervised part highlighted, statistics (kept, dropped,
truncated, skipped, supervised share, a length histogram), and optionally writes every kept example with its
source file and record index as JSONL.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

from ..tokenizer import Tokenizer
from .encode import IGNORE_INDEX, DataSpec, EncodeStats, Example, load_examples

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_BOLD_GREEN, _DIM, _RESET = "\x1b[1;32m", "\x1b[2m", "\x1b[0m"


def render(example: Example, tokenizer: Tokenizer, color: bool) -> str:
    """The example's text with prompt and answer told apart: colours on a terminal, ⟦…⟧ around the answer else."""
    pieces = []
    supervised_run = None
    for token, label in zip(example.input_ids, example.labels):
        supervised = label != IGNORE_INDEX
        if supervised != supervised_run:
            if color:
                pieces.append(_BOLD_GREEN if supervised else _DIM)
            else:
                pieces.append("⟦" if supervised else ("⟧" if supervised_run else ""))
            supervised_run = supervised
        piece = str(tokenizer.hf.convert_ids_to_tokens(token))
        byte = _BYTE_PIECE.fullmatch(piece)  # SentencePiece byte fallback, e.g. <0x0A> for a newline
        pieces.append(bytes([int(byte[1], 16)]).decode("latin-1") if byte else piece.replace("▁", " "))
    pieces.append(_RESET if color else ("⟧" if supervised_run else ""))
    return "".join(pieces)


def histogram(stats: EncodeStats, max_length: int, bins: int = 8, width: int = 40) -> list[str]:
    edges = [round(max_length * (i + 1) / bins) for i in range(bins)]
    counts = [0] * bins
    for length, n in stats.lengths.items():
        counts[min(bins - 1, next(i for i, e in enumerate(edges) if length <= e))] += n
    top = max(counts) or 1
    lines, low = [], 1
    for edge, count in zip(edges, counts):
        lines.append(f"  {low:>5}-{edge:<5} {'█' * round(width * count / top):<{width}} {count}")
        low = edge + 1
    return lines


def inspect_data(data: list[str], tokenizer: Tokenizer, spec: DataSpec, on_bad_record: str = "error",
                 show: int = 3, output: str | None = None, stream=None) -> dict:
    """Print samples and statistics; write every kept example to ``output`` (JSONL) if given. Returns the stats."""
    stream = stream or sys.stdout
    color = stream.isatty() and not os.environ.get("NO_COLOR")
    examples, stats = load_examples(data, tokenizer, spec, on_bad_record)
    legend = "answer (supervised) in green, prompt dimmed" if color else "answer (supervised) between ⟦ ⟧"
    print(f"template {spec.template.name!r}, fields {vars(spec.fields)}, max length {spec.max_length}; {legend}",
          file=stream)
    for example in examples[:show]:
        print(f"\n--- {example.source} [record {example.index}] {len(example.input_ids)} tokens, "
              f"{sum(l != IGNORE_INDEX for l in example.labels)} supervised", file=stream)
        print(render(example, tokenizer, color), file=stream)
    summary = stats.summary()
    print("\nrecords read        ", summary["records"], file=stream)
    print("examples kept       ", summary["kept"], file=stream)
    print("truncated           ", summary["truncated"], f"(cut at {spec.max_length} tokens)", file=stream)
    print("dropped, no answer  ", summary["dropped_all_masked"], "(answer cut away entirely: nothing to learn)",
          file=stream)
    print("bad records skipped ", summary["skipped_bad"], file=stream)
    for reason in stats.skipped.examples:
        print("   ", reason, file=stream)
    print("tokens              ", summary["tokens"], f"({summary['supervised_share']:.1%} supervised)", file=stream)
    print("length histogram (tokens per example):", file=stream)
    for line in histogram(stats, spec.max_length):
        print(line, file=stream)
    if output:
        path = Path(output)
        tmp = path.with_name(path.name + ".tmp")
        with tmp.open("w", encoding="utf-8") as f:
            for e in examples:
                f.write(json.dumps({"file": e.source, "index": e.index, **e.features()}) + "\n")
        tmp.replace(path)
        print(f"wrote {len(examples)} examples to {path}", file=stream)
    return summary
