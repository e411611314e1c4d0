"""Preference records (``--method dpo|orpo``): a prompt, a chosen and a rejected answer, as token ids.

A record is ``{"prompt": …, "chosen": …, "rejected": …}`` or ``{"messages": […], "chosen": …,
"rejected": …}``:

* ``prompt`` — a string, rendered with the prompt template (``--template``, default ``openelm-sep``:
  ``{prompt}<sep>``) exactly as an alpaca instruction is: ``[bos] + prompt``, the answer tokenized on its own,
  then eos.  That is also how ``generate --prompt`` renders a plain prompt for the trained adapter.  A
  ``prompt`` that is a list of messages (TRL's conversational form) is read as ``messages``;
* ``messages`` — the conversation before the answer (system/user/assistant turns, ending with a user turn),
  rendered with the chat template and its generation prompt, the answer as the next assistant turn (its
  content and end token), cut into pieces exactly as supervised training cuts conversations
  (:mod:`elmtune.data.chat`);
* ``chosen`` / ``rejected`` — the preferred and the dispreferred answer: a string, one assistant message
  (``{"role": "assistant", "content": …}``) or a list holding one.  They must differ.

Each pair becomes ``prompt_ids`` (from bos to the answer), ``chosen_ids`` and ``rejected_ids`` (answer tokens and
the end token).  A pair longer than ``max_length`` (prompt + answer) has its answer cut at ``max_length``; a pair
whose prompt alone fills ``max_length`` is dropped (counted), as nothing of either answer would remain.
Every bad record is a :class:`DataError` naming the file, the record and the field (or skipped and counted with
``--on-bad-record skip``).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..tokenizer import Tokenizer
from .chat import ChatTemplate, Piece, split_conversation, tokenize_pieces
from .encode import DataSpec, EncodeStats, FormatStats, _pair_pieces
from .formats import _keys, _type, content_text, normalize_messages
from .records import DataError, Record, read_records

#: How the prompt of a pair was given (the per-format statistics are kept under these names).
PROMPT_FORMATS = {"prompt": "preference", "messages": "preference-chat"}


@dataclass
class Pair:
    """One preference pair, tokenized: the model sees ``prompt_ids + chosen_ids`` and ``prompt_ids + rejected_ids``
    and is scored on the answer tokens."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    source: str
    index: int
    format: str = "preference"

    def features(self) -> dict:
        return {"prompt_ids": self.prompt_ids, "chosen_ids": self.chosen_ids, "rejected_ids": self.rejected_ids}

    @property
    def longest(self) -> int:
        """Tokens of the longer of the two sequences."""
        return len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids))


def is_preference_record(values: dict) -> bool:
    keys = _keys(values)
    return "chosen" in keys and "rejected" in keys


def _answer(record: Record, key: str) -> str:
    """``chosen`` / ``rejected``: a string, one assistant message, or a list holding one."""
    if key not in record.values or record.values[key] is None:
        raise DataError(f"{record.where}: missing field {key!r} (a preference record needs 'chosen' and 'rejected'; "
                        f"the record has: {', '.join(map(str, sorted(_keys(record.values)))) or 'no fields'})")
    value = record.values[key]
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{record.where}: field {key!r} is empty")
        return value
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise DataError(f"{record.where}: field {key!r} must be a string or an assistant message, got {_type(value)}")
    messages = normalize_messages(value, record.where, key)
    if len(messages) != 1 or messages[0]["role"] != "assistant":
        roles = ", ".join(m["role"] for m in messages)
        raise DataError(f"{record.where}: field {key!r} must hold one assistant message (the answer), has: {roles}")
    return messages[0]["content"]


def pair_of(record: Record) -> tuple[str | list[dict], str, str]:
    """(prompt string or normalized messages, chosen text, rejected text) of a preference record."""
    chosen, rejected = _answer(record, "chosen"), _answer(record, "rejected")
    if chosen == rejected:
        raise DataError(f"{record.where}: fields 'chosen' and 'rejected' are identical; a preference pair needs two "
                        "different answers")
    values = record.values
    has_prompt, has_messages = values.get("prompt") is not None, values.get("messages") is not None
    if has_prompt and has_messages:
        raise DataError(f"{record.where}: both 'prompt' and 'messages' given; a preference record has one of them")
    if not (has_prompt or has_messages):
        raise DataError(f"{record.where}: missing field 'prompt' or 'messages' (the record has: "
                        f"{', '.join(map(str, sorted(_keys(values))))})")
    key = "prompt" if has_prompt else "messages"
    value = values[key]
    if key == "prompt" and isinstance(value, str):
        if not value.strip():
            raise DataError(f"{record.where}: field 'prompt' is empty")
        return value, chosen, rejected
    if key == "prompt" and not isinstance(value, list):
        raise DataError(f"{record.where}: field 'prompt' must be a string or a list of messages, got {_type(value)}")
    messages = normalize_messages(value, record.where, key)
    system = values.get("system")
    if system is not None:
        messages.insert(0, {"role": "system", "content": content_text(system, record.where, "system")})
    if messages[-1]["role"] == "assistant":
        raise DataError(f"{record.where}: field {key!r} ends with an assistant turn; it holds the conversation "
                        "before the answer (the answers are 'chosen' and 'rejected')")
    return messages, chosen, rejected


def _chat_pieces(messages: list[dict], answer: str, template: ChatTemplate, tokenizer: Tokenizer,
                 where: str) -> tuple[list[Piece], list[Piece]]:
    """(prompt pieces, answer pieces) of a conversation and its next assistant turn: everything before the turn's
    supervised span, and that span (content and end token), as supervised training cuts it."""
    n = len(messages)
    rendered = split_conversation(messages + [{"role": "assistant", "content": answer}], template, tokenizer,
                                  where=where)
    first = next(k for k, p in enumerate(rendered.pieces) if p.span == n)
    answer_pieces = [p for p in rendered.pieces[first:] if p.span == n]
    return rendered.pieces[:first], answer_pieces


def encode_pairs(records: list[Record], tokenizer: Tokenizer, spec: DataSpec, stats: EncodeStats,
                 skip_bad: bool = False) -> list[Pair]:
    """Tokenize preference records; bad ones raise DataError, or are counted in ``stats.skipped``."""
    template = spec.chat_template_for(tokenizer)
    bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    eos = tokenizer.eos_id
    items = []  # (record, format, prompt pieces, chosen pieces, rejected pieces, turns)
    for record in records:
        stats.records += 1
        try:
            prompt, chosen, rejected = pair_of(record)
            if isinstance(prompt, str):
                text = spec.template.prompt(prompt)
                [p, c] = _pair_pieces(bos, eos, text, chosen, ("prompt", "answer"))
                [_, r] = _pair_pieces(bos, eos, text, rejected, ("prompt", "answer"))
                items.append((record, "prompt", [p], [c], [r], 2))
            else:
                prompt_c, c = _chat_pieces(prompt, chosen, template, tokenizer, record.where)
                prompt_r, r = _chat_pieces(prompt, rejected, template, tokenizer, record.where)
                if [p.text for p in prompt_c] != [p.text for p in prompt_r]:
                    raise DataError(f"{record.where}: the chat template ({template.name}) renders the conversation "
                                    "differently for the chosen and the rejected answer; use a template that "
                                    "renders a conversation turn by turn")
                items.append((record, "messages", prompt_c, c, r, len(prompt) + 1))
        except DataError as error:
            if not skip_bad:
                raise
            stats.skipped.add(str(error))
    # alpaca-style prompts as the tutorial's path encodes them; conversations with special strings kept as text
    tokenize_pieces([p for it in items if it[1] == "prompt" for part in it[2:5] for p in part], tokenizer,
                    special_as_text=False)
    tokenize_pieces([p for it in items if it[1] == "messages" for part in it[2:5] for p in part], tokenizer)
    pairs = []
    for record, kind, prompt_pieces, chosen_pieces, rejected_pieces, turns in items:
        name = PROMPT_FORMATS[kind]
        per_format = stats.formats.setdefault(name, FormatStats())
        per_format.records += 1
        prompt_ids = [i for p in prompt_pieces for i in p.ids]
        chosen_ids = [i for p in chosen_pieces for i in p.ids]
        rejected_ids = [i for p in rejected_pieces for i in p.ids]
        room = spec.max_length - len(prompt_ids)
        if room <= 0:
            stats.dropped_all_masked += 1  # the prompt alone fills max_length: no answer token would remain
            per_format.dropped_all_masked += 1
            continue
        truncated = len(chosen_ids) > room or len(rejected_ids) > room
        pair = Pair(prompt_ids, chosen_ids[:room], rejected_ids[:room], record.source, record.index, name)
        tokens = 2 * len(prompt_ids) + len(pair.chosen_ids) + len(pair.rejected_ids)
        supervised = len(pair.chosen_ids) + len(pair.rejected_ids)
        for s in (stats, per_format):
            s.kept += 1
            s.truncated += truncated
            s.tokens += tokens
            s.supervised_tokens += supervised
        per_format.turns += turns
        stats.lengths[pair.longest] += 1
        pairs.append(pair)
    return pairs


def load_pairs(data: list[str], tokenizer: Tokenizer, spec: DataSpec, on_bad_record: str = "error"):
    """Read and tokenize every preference record of ``data``: (pairs, stats).  A record that is not a preference
    record (no chosen/rejected) is refused with its missing field named."""
    stats = EncodeStats()
    skip_bad = on_bad_record == "skip"
    records = list(read_records(data, stats.skipped if skip_bad else None))
    pairs = encode_pairs(records, tokenizer, spec, stats, skip_bad)
    if stats.records == 0 and stats.skipped.count == 0:
        raise DataError(f"no records found in {', '.join(data)}")
    return pairs, stats


def is_preference_data(data: list[str]) -> bool:
    """Whether ``data`` holds preference records: its first record has ``chosen`` and ``rejected``."""
    try:
        first = next(iter(read_records(data)), None)
    except DataError:
        return False  # the readers will report it
    return first is not None and is_preference_record(first.values)
