"""Record formats: which one a file is in, and a record's content read and checked in that format.

========== ====================================================== =============================================
format     record                                                 what is supervised (by default)
========== ====================================================== =============================================
alpaca     instruction / input / output keys (``--fields``)       the output and eos
messages   ``messages: [{"role": …, "content": …}, …]`` (OpenAI)  every assistant turn (content and end token)
sharegpt   ``conversations: [{"from": …, "value": …}, …]``        every assistant (``gpt``) turn
completion ``prompt`` + ``completion``                            the completion and eos
text       ``text``                                               everything (continued pre-training)
========== ====================================================== =============================================

The format is detected per file from the keys of its records (``--format`` forces one).  The first record that
matches a format decides the file's; a later record that matches another one is an error naming the file and
the record.  Every problem is a :class:`DataError` naming the file, the record and the field.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .records import DataError, Record
from .templates import Fields

FORMATS = ("alpaca", "messages", "sharegpt", "completion", "text")
CONVERSATION_FORMATS = ("messages", "sharegpt")
_CONVERSATION_KEY = {"messages": "messages", "sharegpt": "conversations"}

#: Roles as written in the data → the role chat templates know.  ``messages`` uses OpenAI's names, ``sharegpt``
#: its own; either is accepted in either key.
ROLES = {"system": "system", "user": "user", "assistant": "assistant", "human": "user", "gpt": "assistant"}
_TOOL_ROLES = {"tool", "function", "ipython", "observation", "function_call", "tool_call", "tool_response"}
_KEY_PAIRS = (("role", "content"), ("from", "value"))
_IMAGE_PARTS = {"image", "image_url", "input_image", "image_file"}


def _keys(values: dict) -> set[str]:
    """The keys that hold something: Parquet and ``datasets`` fill a column a record lacks with None."""
    return {k for k, v in values.items() if v is not None}


def detect(values: dict, fields: Fields) -> str | None:
    """The format a record's keys say it is in, or None when they match none (it is then read as alpaca, whose
    missing-field error says what is missing).  The alpaca fields come first, so an alpaca file that also carries
    a pre-rendered ``text`` column stays alpaca; ``messages`` likewise wins over ``text``."""
    keys = _keys(values)
    if fields.instruction in keys and fields.output in keys:
        return "alpaca"
    if "messages" in keys:
        return "messages"
    if "conversations" in keys:
        return "sharegpt"
    if "prompt" in keys and "completion" in keys:
        return "completion"
    if "text" in keys:
        return "text"
    return None


@dataclass
class FormatTracker:
    """Each file's format: forced, or taken from its first record that matches one; records must agree."""

    forced: str = "auto"
    files: dict[str, tuple[str, int]] = field(default_factory=dict)  # source → (format, record that decided it)

    def format_of(self, record: Record, fields: Fields) -> str:
        if self.forced != "auto":
            return self.forced
        found = detect(record.values, fields)
        known = self.files.get(record.source)
        if known is None:
            if found is None:
                return "alpaca"  # not decided yet: its missing-field error names the record
            self.files[record.source] = (found, record.index)
            return found
        file_format, first = known
        if found == file_format or (found is None and file_format == "alpaca"):
            return file_format
        keys = ", ".join(map(str, sorted(_keys(record.values)))) or "no fields"
        looks = f"looks like a {found} record" if found else "matches no format"
        raise DataError(f"{record.where}: this record {looks} (keys: {keys}), but the file's records are "
                        f"{file_format} records (from record {first}); one file holds one format "
                        "(split the file, or force one with --format)")


def _field(record: Record, key: str):
    if key not in record.values or record.values[key] is None:
        raise DataError(f"{record.where}: missing field {key!r} (the record has: "
                        f"{', '.join(map(str, sorted(_keys(record.values)))) or 'no fields'})")
    return record.values[key]


def _type(value) -> str:
    return "null" if value is None else type(value).__name__


def _string(record: Record, key: str, allow_empty: bool = False) -> str:
    value = _field(record, key)
    if not isinstance(value, str):
        extra = ("; conversational prompt/completion records are not supported: use a messages record"
                 if isinstance(value, list) and key in ("prompt", "completion") else "")
        raise DataError(f"{record.where}: field {key!r} must be a string, got {_type(value)}{extra}")
    if not allow_empty and not value.strip():
        raise DataError(f"{record.where}: field {key!r} is empty")
    return value


def completion_of(record: Record) -> tuple[str, str]:
    """(prompt, completion) of a ``completion`` record; the prompt may be empty, the completion may not."""
    return _string(record, "prompt", allow_empty=True), _string(record, "completion")


def text_of(record: Record) -> str:
    return _string(record, "text")


def _refuse_tools(record: Record) -> None:
    tools = record.values.get("tools")
    if tools not in (None, [], "", {}):
        raise DataError(f"{record.where}: field 'tools': tool definitions (function calling) are not supported; "
                        "remove the key or the record")


def content_text(content, where: str, name: str) -> str:
    """A message's content as one string: a string as it is, a list of text parts joined with newlines (as
    OpenAI-compatible servers join them for text-only models).  Images and other parts are refused."""
    if isinstance(content, str):
        text = content
    elif isinstance(content, list):
        texts = []
        for n, part in enumerate(content):
            part_name = f"{name}[{n}]"
            if isinstance(part, str):
                texts.append(part)
                continue
            if not isinstance(part, dict):
                raise DataError(f"{where}: field {part_name!r} must be a text part "
                                f'({{"type": "text", "text": …}}), got {_type(part)}')
            kind = part.get("type", "text")
            if kind in _IMAGE_PARTS or any(k in part for k in _IMAGE_PARTS):
                raise DataError(f"{where}: field {part_name!r}: images are not supported (OpenELM reads text "
                                "only)")
            if kind != "text":
                raise DataError(f"{where}: field {part_name!r}: content parts of type {kind!r} are not "
                                "supported (text parts only)")
            if not isinstance(part.get("text"), str):
                raise DataError(f"{where}: field {part_name + '.text'!r} must be a string, "
                                f"got {_type(part.get('text'))}")
            texts.append(part["text"])
        text = "\n".join(texts)
    else:
        raise DataError(f"{where}: field {name!r} must be a string or a list of text parts, got {_type(content)}")
    if not text.strip():
        raise DataError(f"{where}: field {name!r} is empty")
    return text


def normalize_messages(messages, where: str, name: str = "messages") -> list[dict]:
    """Messages checked and reduced to ``{"role": system|user|assistant, "content": str}``.

    Accepts OpenAI's keys (role/content) or ShareGPT's (from/value), one convention per conversation; roles
    system, user/human, assistant/gpt; content as a string or a list of text parts.  ``where`` and ``name``
    say where the messages came from, for the one-line error."""
    if not isinstance(messages, list):
        raise DataError(f"{where}: field {name!r} must be a list of messages, got {_type(messages)}")
    if not messages:
        raise DataError(f"{where}: field {name!r} is empty")
    out, convention = [], None
    for n, message in enumerate(messages):
        here = f"{name}[{n}]"
        if not isinstance(message, dict):
            raise DataError(f"{where}: field {here!r} must be an object with a role and a content, "
                            f"got {_type(message)}")
        keys = _keys(message)
        if keys & {"tool_calls", "tool_call_id", "function_call"}:
            raise DataError(f"{where}: field {here!r}: tool calls are not supported")
        pairs = [pair for pair in _KEY_PAIRS if keys & set(pair)]
        if len(pairs) != 1:
            raise DataError(f"{where}: field {here!r} must have role/content (or from/value) keys, has: "
                            f"{', '.join(map(str, sorted(keys))) or 'no keys'}" if not pairs else
                            f"{where}: field {here!r} mixes role/content and from/value keys")
        pair = pairs[0]
        if convention is None:
            convention = pair
        elif pair != convention:
            raise DataError(f"{where}: field {here!r} uses {'/'.join(pair)} keys but {name}[0] uses "
                            f"{'/'.join(convention)}: mixed role keys")
        role_key, content_key = pair
        if role_key not in keys:
            raise DataError(f"{where}: field {here + '.' + role_key!r} is missing")
        role = message[role_key]
        if not isinstance(role, str):
            raise DataError(f"{where}: field {here + '.' + role_key!r} must be a string, got {_type(role)}")
        if role in _TOOL_ROLES:
            raise DataError(f"{where}: field {here + '.' + role_key!r}: {role!r} messages (tool use) are not "
                            "supported")
        if role not in ROLES:
            raise DataError(f"{where}: field {here + '.' + role_key!r}: unknown role {role!r} (known: system, "
                            "user or human, assistant or gpt)")
        if content_key not in keys:
            raise DataError(f"{where}: field {here + '.' + content_key!r} is missing")
        out.append({"role": ROLES[role], "content": content_text(message[content_key], where,
                                                                  f"{here}.{content_key}")})
    return out


def conversation_of(record: Record, format: str, require_assistant_end: bool) -> list[dict]:
    """The normalized messages of a ``messages`` or ``sharegpt`` record.  A top-level ``system`` string is put
    first; a top-level ``tools`` is refused.  ``require_assistant_end``: training on assistant turns needs
    the conversation to end with one."""
    _refuse_tools(record)
    key = _CONVERSATION_KEY[format]
    messages = normalize_messages(_field(record, key), record.where, key)
    system = record.values.get("system")
    if system is not None:
        messages.insert(0, {"role": "system", "content": content_text(system, record.where, "system")})
    if require_assistant_end and messages[-1]["role"] != "assistant":
        raise DataError(f"{record.where}: field {key!r}: the conversation ends with a {messages[-1]['role']} "
                        "turn; training on assistant turns needs it to end with an assistant turn "
                        "(or use --train-on all)")
    return messages
