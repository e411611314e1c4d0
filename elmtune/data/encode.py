"""Records → training examples (``input_ids``, ``attention_mask``, ``labels``), in every record format.

An alpaca record is encoded as the tutorial's ``process_func`` does: ``[bos] + prompt + answer + [eos]``, the
prompt (and bos) masked with -100, the answer and the eos supervised — eos is the pad token, and it is still
learned, because labels are built here and padding is added later with -100.  A ``completion`` record is the
same with its prompt and completion, read as plain text: the completion is tokenized as the continuation of the
prompt, so the two decode to the prompt and completion joined; a ``text`` record is ``[bos] + text + [eos]``, all supervised.  A
conversation (``messages``, ``sharegpt``) is rendered with the chat template and cut into pieces that never
straddle a role boundary (:mod:`elmtune.data.chat`); by default every assistant turn — content and end token —
is supervised, and nothing else (``--train-on last-turn`` keeps only the last one, ``all`` every token).
Every piece of text is tokenized on its own, as the tutorial tokenizes its prompt and its answer; bos is never
a target.

An example longer than ``max_length`` keeps its longest run of whole turns from the start that still holds a
supervised token (ending with a turn that holds one); when not even that fits, it is cut at ``max_length``
exactly as the tutorial cuts (head kept), and dropped — counted — only when nothing supervised remains.  For a
one-turn record this is exactly the tutorial's cut.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from ..tokenizer import Tokenizer
from .chat import ChatTemplate, Continuation, Piece, split_conversation, tokenize_pieces
from .formats import CONVERSATION_FORMATS, FORMATS, FormatTracker, completion_of, conversation_of, text_of
from .records import DataError, Record, SkipLog, read_records
from .templates import Fields, Template

IGNORE_INDEX = -100
_CHUNK = 2048  # records tokenized per batch
TRAIN_ON = ("all-assistant", "last-turn", "all")


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    source: str
    index: int
    format: str = "alpaca"
    turns: list[tuple[str, int, int]] = field(default_factory=list)  # (role, first token, end) of each kept turn

    @property
    def attention_mask(self) -> list[int]:
        return [1] * len(self.input_ids)

    def features(self) -> dict:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "labels": self.labels}


@dataclass
class FormatStats:
    """What one record format contributed."""

    records: int = 0
    kept: int = 0
    truncated: int = 0
    dropped_all_masked: int = 0
    turns: int = 0  # messages in the kept conversations (before truncation)
    tokens: int = 0
    supervised_tokens: int = 0

    def summary(self) -> dict:
        return {**vars(self), "supervised_share": round(self.supervised_tokens / self.tokens, 4) if self.tokens
                else 0.0}


@dataclass
class EncodeStats:
    records: int = 0
    kept: int = 0
    truncated: int = 0
    dropped_all_masked: int = 0
    skipped: SkipLog = field(default_factory=SkipLog)
    tokens: int = 0
    supervised_tokens: int = 0
    lengths: Counter = field(default_factory=Counter)
    formats: dict[str, FormatStats] = field(default_factory=dict)
    files: FormatTracker | None = field(default=None, repr=False)  # each file's format, across chunks

    def summary(self) -> dict:
        return {"records": self.records, "kept": self.kept, "truncated": self.truncated,
                "dropped_all_masked": self.dropped_all_masked, "skipped_bad": self.skipped.count,
                "tokens": self.tokens, "supervised_tokens": self.supervised_tokens,
                "supervised_share": round(self.supervised_tokens / self.tokens, 4) if self.tokens else 0.0,
                "formats": {name: stats.summary() for name, stats in self.formats.items()}}


@dataclass
class DataSpec:
    """Everything that decides what the model is trained on; saved with the adapter.

    ``template`` and ``fields`` shape alpaca records; ``format`` is ``auto`` (each file's detected from its keys)
    or one of :data:`~elmtune.data.formats.FORMATS` forced; ``chat_template`` renders conversations (None:
    the tokenizer's own, else ``openelm``); ``train_on`` picks the supervised tokens of conversations."""

    template: Template
    fields: Fields
    max_length: int
    format: str = "auto"
    chat_template: ChatTemplate | None = None
    train_on: str = "all-assistant"

    @classmethod
    def parse(cls, template: str, fields: str, max_length: int, format: str = "auto",
              chat_template: str | None = "auto", train_on: str = "all-assistant") -> "DataSpec":
        if max_length < 2:
            raise ValueError(f"--max-length must be at least 2, got {max_length}")
        if format not in ("auto", *FORMATS):
            raise ValueError(f"--format {format!r}: use auto, {', '.join(FORMATS)}")
        if train_on not in TRAIN_ON:
            raise ValueError(f"--train-on {train_on!r}: use {', '.join(TRAIN_ON)}")
        return cls(Template.parse(template), Fields.parse(fields), max_length, format,
                   ChatTemplate.parse(chat_template), train_on)

    @classmethod
    def from_options(cls, options) -> "DataSpec":
        """From :class:`~elmtune.training.args.DataOptions` (or :class:`TrainOptions`)."""
        return cls.parse(options.template, options.fields, options.max_length, options.format,
                         options.chat_template, options.train_on)

    def chat_template_for(self, tokenizer: Tokenizer) -> ChatTemplate:
        """The chat template conversations are rendered with under ``tokenizer``."""
        return ChatTemplate.resolve(self.chat_template, tokenizer)

    def adapter_metadata(self, tokenizer: Tokenizer, stats: EncodeStats | None = None) -> dict:
        """What an adapter must carry (next to ``template``/``fields``/``max_length``) so that inference renders
        exactly as training did: the format option, the formats the data was in (records of each), the chat
        template's name and Jinja source itself, and ``train_on``.  Read back with
        :func:`elmtune.data.chat.chat_template_for_adapter`."""
        return {"format": self.format,
                "formats": {name: s.records for name, s in stats.formats.items()} if stats else {},
                "chat_template": self.chat_template_for(tokenizer).to_dict(), "train_on": self.train_on}


@dataclass
class _Item:
    record: Record
    format: str
    pieces: list[Piece]
    turns: int = 0
    supervise_all: bool = False
    last_span: int | None = None


def _pair_pieces(bos: list[int], eos: int, prompt: str, answer: str, roles: tuple[str, str],
                 continued: bool = False) -> list[Piece]:
    """``[bos] prompt`` and ``answer [eos]``; the answer tokenized on its own (the tutorial's way), or
    ``continued`` from the prompt (plain text: the two decode to prompt + answer)."""
    answer_unit = Continuation(answer) if continued and prompt else answer
    return [Piece(prompt, 0, roles[0], None, bos + ([prompt] if prompt else [])),
            Piece(answer, 1, roles[1], 1, [answer_unit, eos])]


def _item(record: Record, fmt: str, spec: DataSpec, template: ChatTemplate, tokenizer: Tokenizer,
          bos: list[int], eos: int) -> _Item:
    """A record as pieces to tokenize (raises DataError for a bad one); ``bos`` is ``[]`` or ``[bos id]``."""
    if record.values.get("chosen") is not None and record.values.get("rejected") is not None:
        raise DataError(f"{record.where}: a preference record (chosen/rejected); train on preference data with "
                        "--method dpo or orpo")
    if fmt == "alpaca":
        instruction, input_text, output = spec.fields.extract(record)
        pieces = _pair_pieces(bos, eos, spec.template.prompt(instruction, input_text), output, ("prompt", "answer"))
        return _Item(record, fmt, pieces, 2, spec.train_on == "all", 1)
    if fmt == "completion":
        prompt, completion = completion_of(record)
        return _Item(record, fmt, _pair_pieces(bos, eos, prompt, completion, ("prompt", "completion"), True), 2,
                     spec.train_on == "all", 1)
    if fmt == "text":
        text = text_of(record)
        return _Item(record, fmt, [Piece(text, 0, "text", 0, bos + [text, eos])], 1, True, 0)
    assert fmt in CONVERSATION_FORMATS, fmt
    messages = conversation_of(record, fmt, require_assistant_end=spec.train_on != "all")
    rendered = split_conversation(messages, template, tokenizer, where=record.where)
    return _Item(record, fmt, rendered.pieces, len(messages), spec.train_on == "all",
                 rendered.assistant_turns[-1] if rendered.assistant_turns else None)


def _fit(labels: list[int], turns: list[list], supervised: int, max_length: int) -> int:
    """How many tokens to keep (0: nothing supervised would remain): all when they fit; else up to the end of the
    last whole turn that fits and holds a supervised token; else the first ``max_length``.  ``turns`` are
    ``[turn, role, start, end, supervised tokens]``."""
    if len(labels) <= max_length:
        return len(labels) if supervised else 0
    best = 0
    for *_, end, count in turns:
        if end > max_length:
            break
        if count:
            best = end
    if best:
        return best
    return max_length if any(label != IGNORE_INDEX for label in labels[:max_length]) else 0


def _example(item: _Item, spec: DataSpec, bos_id: int | None) -> tuple[Example | None, bool, int]:
    """(the example, or None when nothing supervised remains; whether it was cut; its supervised tokens)."""
    input_ids: list[int] = []
    labels: list[int] = []
    turns: list[list] = []  # [turn, role, start, end, supervised tokens]
    for piece in item.pieces:
        supervised = item.supervise_all or (piece.span is not None and (
            spec.train_on != "last-turn" or piece.span == item.last_span))
        if not (turns and turns[-1][0] == piece.turn):
            turns.append([piece.turn, piece.role, len(input_ids), len(input_ids), 0])
        input_ids += piece.ids
        labels += piece.ids if supervised else [IGNORE_INDEX] * len(piece.ids)
        turns[-1][3] = len(input_ids)
        turns[-1][4] += len(piece.ids) if supervised else 0
    if input_ids and labels[0] != IGNORE_INDEX and input_ids[0] == bos_id:
        labels[0] = IGNORE_INDEX  # nothing precedes bos: it is never a target
        turns[0][4] -= 1
    supervised = sum(t[4] for t in turns)
    keep = _fit(labels, turns, supervised, spec.max_length)
    truncated = keep < len(input_ids)
    if keep == 0:
        return None, truncated, 0
    if truncated:
        supervised = sum(label != IGNORE_INDEX for label in labels[:keep])
    kept_turns = [(role, a, min(b, keep)) for _, role, a, b, _ in turns if a < keep]
    return (Example(input_ids[:keep], labels[:keep], item.record.source, item.record.index, item.format,
                    kept_turns), truncated, supervised)


def encode_records(records: list[Record], tokenizer: Tokenizer, spec: DataSpec, stats: EncodeStats,
                   skip_bad: bool = False) -> list[Example]:
    """Encode ``records``; bad ones raise DataError, or are counted in ``stats.skipped`` when ``skip_bad``.
    ``stats`` also carries each file's format from one call to the next."""
    if stats.files is None:
        stats.files = FormatTracker(spec.format)
    template = spec.chat_template_for(tokenizer)
    bos_id, eos_id = tokenizer.bos_id, tokenizer.eos_id
    bos = [bos_id] if bos_id is not None else []
    items: list[_Item] = []
    for record in records:
        stats.records += 1
        try:
            fmt = stats.files.format_of(record, spec.fields)
            item = _item(record, fmt, spec, template, tokenizer, bos, eos_id)
        except DataError as error:
            if not skip_bad:
                raise
            stats.skipped.add(str(error))
            continue
        items.append(item)
    # One batched tokenizer call per kind: alpaca text exactly as the tutorial encodes it, the rest with
    # special-token strings kept as text (the template's own control tokens are ids already).
    tokenize_pieces([p for i in items if i.format == "alpaca" for p in i.pieces], tokenizer, special_as_text=False)
    tokenize_pieces([p for i in items if i.format != "alpaca" for p in i.pieces], tokenizer)
    examples = []
    for item in items:
        per_format = stats.formats.setdefault(item.format, FormatStats())
        per_format.records += 1
        example, truncated, supervised = _example(item, spec, bos_id)
        if example is None:
            stats.dropped_all_masked += 1  # would train on nothing (NaN or zero loss): never keep it
            per_format.dropped_all_masked += 1
            continue
        for s in (stats, per_format):
            s.kept += 1
            s.truncated += truncated
            s.tokens += len(example.input_ids)
            s.supervised_tokens += supervised
        per_format.turns += item.turns
        stats.lengths[len(example.input_ids)] += 1
        examples.append(example)
    return examples


def load_examples(data: list[str], tokenizer: Tokenizer, spec: DataSpec, on_bad_record: str = "error"):
    """Read and encode every record of ``data``: (examples, stats)."""
    stats = EncodeStats()
    skip_bad = on_bad_record == "skip"
    examples: list[Example] = []
    chunk: list[Record] = []
    for record in read_records(data, stats.skipped if skip_bad else None):
        chunk.append(record)
        if len(chunk) == _CHUNK:
            examples += encode_records(chunk, tokenizer, spec, stats, skip_bad)
            chunk = []
    examples += encode_records(chunk, tokenizer, spec, stats, skip_bad)
    if stats.records == 0 and stats.skipped.count == 0:
        raise DataError(f"no records found in {', '.join(data)}")
    return examples, stats
