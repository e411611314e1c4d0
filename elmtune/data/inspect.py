"""``elmtune data inspect``: what exactly will the model be trained on?

Shows a few examples rendered token by token with the supervised part highlighted (conversations turn by turn),
statistics (kept, dropped, truncated, skipped, supervised share, a length histogram, and the same per record
format), and optionally writes every kept example with its source file and record index as JSONL — the same
columns whatever the format.  Preference data (records with ``chosen`` and ``rejected``, for ``train --method
dpo|orpo``) is recognised from its first record and shown pair by pair: the prompt and both answers as training
tokenizes them (:func:`inspect_pairs`).
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

from ..tokenizer import Tokenizer
from .encode import IGNORE_INDEX, DataSpec, EncodeStats, Example, load_examples
from .formats import CONVERSATION_FORMATS
from .preference import Pair, is_preference_data, load_pairs

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_BOLD_GREEN, _DIM, _RESET = "\x1b[1;32m", "\x1b[2m", "\x1b[0m"


def render(example: Example, tokenizer: Tokenizer, color: bool, start: int = 0, end: int | None = None) -> str:
    """The example's text (tokens ``start:end``) with prompt and answer told apart: colours on a terminal, ⟦…⟧
    around the supervised tokens else.  Runs of SentencePiece byte pieces (``<0xE5><0xB7><0xB4>``) are shown
    as the UTF-8 characters they spell."""
    pieces: list[str] = []
    pending = bytearray()
    supervised_run = None

    def flush() -> None:
        if pending:
            pieces.append(pending.decode("utf-8", errors="replace"))
            pending.clear()

    for token, label in zip(example.input_ids[start:end], example.labels[start:end]):
        supervised = label != IGNORE_INDEX
        if supervised != supervised_run:
            flush()
            if color:
                pieces.append(_BOLD_GREEN if supervised else _DIM)
            else:
                pieces.append("⟦" if supervised else ("⟧" if supervised_run else ""))
            supervised_run = supervised
        piece = str(tokenizer.hf.convert_ids_to_tokens(token))
        byte = _BYTE_PIECE.fullmatch(piece)  # SentencePiece byte fallback, e.g. <0x0A> for a newline
        if byte:
            pending.append(int(byte[1], 16))
        else:
            flush()
            pieces.append(piece.replace("▁", " "))
    flush()
    pieces.append(_RESET if color else ("⟧" if supervised_run else ""))
    return "".join(pieces)


def render_turns(example: Example, tokenizer: Tokenizer, color: bool) -> str:
    """A conversation turn by turn: the role, then the turn's tokens (supervised ones highlighted)."""
    width = max(len(role) for role, _, _ in example.turns)
    lines = []
    for role, start, end in example.turns:
        text = render(example, tokenizer, color, start, end).split("\n")
        lines.append(f"  {role:>{width}} │ {text[0]}")
        lines += [f"  {'':>{width}} │ {line}" for line in text[1:]]
    return "\n".join(lines)


def format_table(stats: EncodeStats) -> list[str]:
    """Per-format statistics, one line per format seen."""
    lines = [f"  {'format':<11}{'records':>8}{'kept':>8}{'truncated':>10}{'dropped':>8}{'turns':>7}"
             f"{'tokens':>9}{'supervised':>11}"]
    for name, s in sorted(stats.formats.items()):
        share = f"{s.supervised_tokens / s.tokens:.1%}" if s.tokens else "-"
        lines.append(f"  {name:<11}{s.records:>8}{s.kept:>8}{s.truncated:>10}{s.dropped_all_masked:>8}{s.turns:>7}"
                     f"{s.tokens:>9}{share:>11}")
    return lines


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


def _pair_rows(pair: Pair, tokenizer: Tokenizer, color: bool) -> str:
    """A preference pair: the prompt, then each answer (the scored tokens highlighted)."""
    rows = []
    prompt = Example(pair.prompt_ids, [IGNORE_INDEX] * len(pair.prompt_ids), pair.source, pair.index)
    for name, example, start in (("prompt", prompt, 0),
                                 ("chosen", Example(pair.prompt_ids + pair.chosen_ids,
                                                    prompt.labels + pair.chosen_ids, pair.source, pair.index),
                                  len(pair.prompt_ids)),
                                 ("rejected", Example(pair.prompt_ids + pair.rejected_ids,
                                                      prompt.labels + pair.rejected_ids, pair.source, pair.index),
                                  len(pair.prompt_ids))):
        text = render(example, tokenizer, color, start).split("\n")
        rows.append(f"  {name:>8} │ {text[0]}")
        rows += [f"  {'':>8} │ {line}" for line in text[1:]]
    return "\n".join(rows)


def print_statistics(stats, spec: DataSpec, rows: list, stream, *, noun: str, truncated: str, dropped: str,
                     tokens: str, lengths: str, output: str | None) -> dict:
    """The statistics block both views end with, and every kept row (example or pair) written to ``output``
    (JSONL, atomically); returns the summary."""
    summary = stats.summary()
    print("\nrecords read        ", summary["records"], file=stream)
    print(f"{noun + 's kept':<20}", summary["kept"], file=stream)
    print("truncated           ", summary["truncated"], f"({truncated})", file=stream)
    print("dropped, no answer  ", summary["dropped_all_masked"], f"({dropped})", file=stream)
    print("bad records skipped ", summary["skipped_bad"], file=stream)
    for reason in stats.skipped.examples:
        print("   ", reason, file=stream)
    print("tokens              ", summary["tokens"], f"({tokens.format(share=summary['supervised_share'])})",
          file=stream)
    if stats.formats:
        print("per format:", file=stream)
        for line in format_table(stats):
            print(line, file=stream)
    print(f"length histogram (tokens {lengths}):", file=stream)
    for line in histogram(stats, spec.max_length):
        print(line, file=stream)
    if output:
        path = Path(output)
        tmp = path.with_name(path.name + ".tmp")
        with tmp.open("w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps({"file": row.source, "index": row.index, **row.features()}) + "\n")
        tmp.replace(path)
        print(f"wrote {len(rows)} {noun}s to {path}", file=stream)
    return summary


def inspect_pairs(data: list[str], tokenizer: Tokenizer, spec: DataSpec, on_bad_record: str = "error",
                  show: int = 3, output: str | None = None, stream=None, color: bool = False) -> dict:
    """``data inspect`` of preference records (``--method dpo|orpo`` data): each pair's prompt and its two answers
    as training tokenizes them, and the statistics; ``output`` gets every kept pair's ids (JSONL)."""
    stream = stream or sys.stdout
    pairs, stats = load_pairs(data, tokenizer, spec, on_bad_record)
    legend = "scored answer tokens in green, prompt dimmed" if color else "scored answer tokens between ⟦ ⟧"
    print(f"preference pairs (prompt, chosen, rejected); template {spec.template.name!r} for prompt strings, chat "
          f"template {spec.chat_template_for(tokenizer).name!r} for messages; max length {spec.max_length}; {legend}",
          file=stream)
    for pair in pairs[:show]:
        print(f"\n--- {pair.source} [record {pair.index}] {pair.format}, prompt {len(pair.prompt_ids)} tokens, "
              f"chosen {len(pair.chosen_ids)}, rejected {len(pair.rejected_ids)}", file=stream)
        print(_pair_rows(pair, tokenizer, color), file=stream)
    return print_statistics(stats, spec, pairs, stream, noun="pair",
                            truncated=f"an answer cut at {spec.max_length} tokens with its prompt",
                            dropped="the prompt alone fills --max-length",
                            tokens="prompt twice + both answers; {share:.1%} scored",
                            lengths="of the longer sequence of each pair", output=output)


def inspect_data(data: list[str], tokenizer: Tokenizer, spec: DataSpec, on_bad_record: str = "error",
                 show: int = 3, output: str | None = None, stream=None) -> dict:
    """Print samples and statistics; write every kept example to ``output`` (JSONL) if given. Returns the stats."""
    stream = stream or sys.stdout
    color = stream.isatty() and not os.environ.get("NO_COLOR")
    if is_preference_data(data):
        return inspect_pairs(data, tokenizer, spec, on_bad_record, show, output, stream, color)
    examples, stats = load_examples(data, tokenizer, spec, on_bad_record)
    legend = "answer (supervised) in green, prompt dimmed" if color else "answer (supervised) between ⟦ ⟧"
    print(f"template {spec.template.name!r}, fields {vars(spec.fields)}, max length {spec.max_length}; {legend}",
          file=stream)
    if any(name in CONVERSATION_FORMATS for name in stats.formats) or spec.train_on != "all-assistant":
        print(f"conversations: chat template {spec.chat_template_for(tokenizer).name!r}, training on "
              f"{spec.train_on}", file=stream)
    for example in examples[:show]:
        print(f"\n--- {example.source} [record {example.index}] {example.format}, "
              + (f"{len(example.turns)} turns, " if example.format in CONVERSATION_FORMATS else "")
              + f"{len(example.input_ids)} tokens, {sum(l != IGNORE_INDEX for l in example.labels)} supervised",
              file=stream)
        if example.format in CONVERSATION_FORMATS and example.turns:
            print(render_turns(example, tokenizer, color), file=stream)
        else:
            print(render(example, tokenizer, color), file=stream)
    return print_statistics(stats, spec, examples, stream, noun="example",
                            truncated=f"cut at {spec.max_length} tokens",
                            dropped="answer cut away entirely: nothing to learn",
                            tokens="{share:.1%} supervised", lengths="per example", output=output)
