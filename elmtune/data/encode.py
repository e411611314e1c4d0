"""Records → training examples (``input_ids``, ``attention_mask``, ``labels``), as the tutorial's ``process_func``.

An example is ``[bos] + prompt + answer + [eos]``; the prompt (and bos) is masked with -100, the answer and the
eos are supervised — eos is the pad token, and it is still learned, because labels are built here and padding
is added later with -100.  Examples longer than ``max_length`` are cut at ``max_length`` exactly as the
tutorial does (head kept); an example whose answer is cut away entirely has nothing to learn from and is dropped.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from ..tokenizer import Tokenizer
from .records import DataError, Record, SkipLog, read_records
from .templates import Fields, Template

IGNORE_INDEX = -100
_CHUNK = 2048  # records tokenized per batch


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    source: str
    index: int

    @property
    def attention_mask(self) -> list[int]:
        return [1] * len(self.input_ids)

    def features(self) -> dict:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "labels": self.labels}


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

    def summary(self) -> dict:
        return {"records": self.records, "kept": self.kept, "truncated": self.truncated,
                "dropped_all_masked": self.dropped_all_masked, "skipped_bad": self.skipped.count,
                "tokens": self.tokens, "supervised_tokens": self.supervised_tokens,
                "supervised_share": round(self.supervised_tokens / self.tokens, 4) if self.tokens else 0.0}


@dataclass
class DataSpec:
    """Everything that decides what the model is trained on; saved with the adapter."""

    template: Template
    fields: Fields
    max_length: int

    @classmethod
    def parse(cls, template: str, fields: str, max_length: int) -> "DataSpec":
        if max_length < 2:
            raise ValueError(f"--max-length must be at least 2, got {max_length}")
        return cls(Template.parse(template), Fields.parse(fields), max_length)


def encode_pair(tokenizer: Tokenizer, prompt_ids: list[int], answer_ids: list[int], max_length: int):
    """(input_ids, labels, truncated) for one tokenized prompt/answer pair."""
    head = ([tokenizer.bos_id] if tokenizer.bos_id is not None else []) + prompt_ids
    input_ids = head + answer_ids + [tokenizer.eos_id]
    labels = [IGNORE_INDEX] * len(head) + answer_ids + [tokenizer.eos_id]
    truncated = len(input_ids) > max_length
    return input_ids[:max_length], labels[:max_length], truncated


def encode_records(records: list[Record], tokenizer: Tokenizer, spec: DataSpec, stats: EncodeStats,
                   skip_bad: bool = False) -> list[Example]:
    """Encode ``records``; bad ones raise DataError, or are counted in ``stats.skipped`` when ``skip_bad``."""
    prompts, answers, kept_records = [], [], []
    for record in records:
        stats.records += 1
        try:
            instruction, input_text, output = spec.fields.extract(record)
        except DataError as error:
            if not skip_bad:
                raise
            stats.skipped.add(str(error))
            continue
        prompts.append(spec.template.prompt(instruction, input_text))
        answers.append(output)
        kept_records.append(record)
    examples = []
    for record, prompt_ids, answer_ids in zip(kept_records, tokenizer.encode(prompts), tokenizer.encode(answers)):
        input_ids, labels, truncated = encode_pair(tokenizer, prompt_ids, answer_ids, spec.max_length)
        supervised = sum(label != IGNORE_INDEX for label in labels)
        if supervised == 0:
            stats.dropped_all_masked += 1  # would train on nothing (NaN or zero loss): never keep it
            continue
        stats.kept += 1
        stats.truncated += truncated
        stats.tokens += len(input_ids)
        stats.supervised_tokens += supervised
        stats.lengths[len(input_ids)] += 1
        examples.append(Example(input_ids, labels, record.source, record.index))
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
