"""Record formats: detection per file, Parquet and CSV, mixed formats, and every bad record in the new formats as
a one-line error naming file, record and field — or a counted skip."""

from __future__ import annotations

import json

import pytest

from elmtune.data import DataError, DataSpec, load_examples, read_records
from elmtune.data.formats import detect, normalize_messages
from elmtune.data.templates import Fields
from tests.helpers import write_jsonl

CHAT = {"messages": [{"role": "system", "content": "Answer briefly."},
                     {"role": "user", "content": "Name a colour."},
                     {"role": "assistant", "content": "Blue."}]}
SHAREGPT = {"conversations": [{"from": "human", "value": "你好"}, {"from": "gpt", "value": "你好！有什么可以帮你？"}]}
COMPLETION = {"prompt": "The capital of France is", "completion": " Paris."}
TEXT = {"text": "Café culture in Paris.\n\n巴黎的咖啡馆文化。"}
ALPACA = {"instruction": "Translate to French", "input": "", "output": "Bonjour"}


def load(paths, tok, on_bad_record="error", **spec):
    spec = DataSpec.parse("openelm-sep", spec.pop("fields", "zh"), spec.pop("max_length", 128), **spec)
    return load_examples(paths if isinstance(paths, list) else [paths], tok, spec, on_bad_record)


@pytest.mark.parametrize("record, expected", [
    (ALPACA, "alpaca"), (CHAT, "messages"), (SHAREGPT, "sharegpt"), (COMPLETION, "completion"), (TEXT, "text"),
    ({**ALPACA, "text": "### Instruction: …"}, "alpaca"),  # a pre-rendered text column does not make it text
    ({**CHAT, "text": "<s>…"}, "messages"),
    ({"messages": None, "text": "a"}, "text"),  # Parquet/datasets fill missing columns with None
    ({"prompt": "p", "response": "r"}, None),
])
def test_detection_from_keys(record, expected):
    assert detect(record, Fields.parse("zh")) == expected


def test_every_format_loads_and_mixed_formats_across_files_work(tmp_path, llama2):
    files = [write_jsonl(tmp_path / f"{n}.jsonl", [r, r]) for n, r in
             enumerate([ALPACA, CHAT, SHAREGPT, COMPLETION, TEXT])]
    examples, stats = load(files, llama2)
    assert [e.format for e in examples] == [f for f in FORMATS_IN_ORDER for _ in range(2)]
    assert {name: s.records for name, s in stats.formats.items()} == {f: 2 for f in FORMATS_IN_ORDER}
    assert stats.formats["messages"].turns == 6 and stats.formats["sharegpt"].turns == 4
    assert stats.summary()["formats"]["text"]["kept"] == 2


FORMATS_IN_ORDER = ["alpaca", "messages", "sharegpt", "completion", "text"]


def test_a_directory_of_files_in_different_formats(tmp_path, llama2):
    import pyarrow as pa
    import pyarrow.parquet as pq

    write_jsonl(tmp_path / "a.jsonl", [CHAT])
    (tmp_path / "b.json").write_text(json.dumps([ALPACA]))
    (tmp_path / "c.csv").write_text("prompt,completion\nThe sky is, blue.\n")
    pq.write_table(pa.Table.from_pylist([TEXT]), tmp_path / "d.parquet")
    examples, stats = load(str(tmp_path), llama2)
    assert [e.format for e in examples] == ["messages", "alpaca", "completion", "text"]


def test_forced_format(tmp_path, llama2):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "hello", "messages": CHAT["messages"]}])
    [example], _ = load(path, llama2, format="text")
    assert example.format == "text"
    with pytest.raises(DataError, match=r"record 0 \(line 1\): missing field 'prompt' \(the record has: messages, text\)"):
        load(path, llama2, format="completion")


def test_parquet_with_nested_messages_and_nulls(tmp_path, llama2):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [CHAT, {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "chat.parquet")
    records = list(read_records([str(tmp_path / "chat.parquet")]))
    assert records[0].values == CHAT and records[1].index == 1
    examples, stats = load(str(tmp_path / "chat.parquet"), llama2)
    assert len(examples) == 2 and stats.formats["messages"].records == 2
    # a column one file lacks in some rows comes back as None: read as absent
    pq.write_table(pa.Table.from_pylist([{**ALPACA, "text": None}, {**ALPACA, "input": None, "text": None}]),
                   tmp_path / "alpaca.parquet")
    assert [e.format for e in load(str(tmp_path / "alpaca.parquet"), llama2)[0]] == ["alpaca", "alpaca"]


def test_parquet_that_is_not_parquet(tmp_path, llama2):
    (tmp_path / "x.parquet").write_text("not parquet")
    with pytest.raises(DataError, match="x.parquet: not a readable Parquet file"):
        load(str(tmp_path / "x.parquet"), llama2)


def test_csv_cells_are_kept_as_written(tmp_path, llama2):
    path = tmp_path / "d.csv"
    path.write_text('instruction,input,output\n"Add, then say","1 + 41","42"\n"Two\nlines","","naïve 中文"\n',
                    encoding="utf-8")
    records = list(read_records([str(path)]))
    assert records[0].values == {"instruction": "Add, then say", "input": "1 + 41", "output": "42"}  # no int 42
    assert records[1].values["instruction"] == "Two\nlines" and records[1].line == 3
    assert len(load(str(path), llama2)[0]) == 2


def test_csv_messages_cell_holds_json(tmp_path, llama2):
    path = tmp_path / "chat.csv"
    cell = json.dumps(CHAT["messages"]).replace('"', '""')
    path.write_text(f'messages\n"{cell}"\n"[broken"\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"chat.csv: record 1 \(line 3\): column 'messages': invalid JSON"):
        load(str(path), llama2)
    examples, stats = load(str(path), llama2, on_bad_record="skip")
    assert len(examples) == 1 and examples[0].format == "messages" and stats.skipped.count == 1


@pytest.mark.parametrize("content, message", [
    ("a,b\n1,2,3\n", r"record 0 \(line 2\): has 3 cells, the header has 2"),
    ("a,a\n1,2\n", "line 1: the column 'a' appears twice"),
    ("", "the file is empty"),
])
def test_csv_problems(tmp_path, llama2, content, message):
    path = tmp_path / "d.csv"
    path.write_text(content)
    with pytest.raises(DataError, match=message) as error:
        load(str(path), llama2)
    assert str(error.value).startswith(str(path)) and "\n" not in str(error.value)


def user(text):
    return {"role": "user", "content": text}


def bot(text):
    return {"role": "assistant", "content": text}


BAD = [
    ({"messages": [user("hi"), {"role": "bot", "content": "x"}]},
     "field 'messages[1].role': unknown role 'bot'"),
    ({"messages": [user("hi"), {"role": "tool", "content": "42"}, bot("ok")]},
     "field 'messages[1].role': 'tool' messages (tool use) are not supported"),
    ({"messages": [user("hi"), bot("hello"), user("and?")]},
     "field 'messages': the conversation ends with a user turn"),
    ({"messages": [user("hi"), bot("")]}, "field 'messages[1].content' is empty"),
    ({"messages": [user("  \n "), bot("x")]}, "field 'messages[0].content' is empty"),
    ({"messages": [user("hi"), bot(42)]}, "field 'messages[1].content' must be a string or a list of text parts, got int"),
    ({"messages": [user("hi"), bot(None)]}, "field 'messages[1].content' is missing"),
    ({"messages": [user([{"type": "image_url", "image_url": {"url": "x.png"}}]), bot("a cat")]},
     "field 'messages[0].content[0]': images are not supported"),
    ({"messages": [user([{"type": "input_audio"}]), bot("x")]}, "content parts of type 'input_audio' are not supported"),
    ({"messages": [user("hi"), {"from": "gpt", "value": "x"}]},
     "field 'messages[1]' uses from/value keys but messages[0] uses role/content: mixed role keys"),
    ({"messages": [{"role": "user", "value": "x"}]}, "field 'messages[0]' mixes role/content and from/value keys"),
    ({"messages": [{"content": "x"}]}, "field 'messages[0].role' is missing"),
    ({"messages": [{"text": "x"}]}, "field 'messages[0]' must have role/content (or from/value) keys, has: text"),
    ({"messages": [user("hi"), {"role": "assistant", "content": None, "tool_calls": [{}]}]},
     "field 'messages[1]': tool calls are not supported"),
    ({**{"messages": [user("hi"), bot("x")]}, "tools": [{"type": "function"}]},
     "field 'tools': tool definitions (function calling) are not supported"),
    ({"messages": "hi"}, "field 'messages' must be a list of messages, got str"),
    ({"messages": []}, "field 'messages' is empty"),
    ({"messages": ["hi"]}, "field 'messages[0]' must be an object with a role and a content, got str"),
    ({"conversations": [{"from": "human", "value": "hi"}, {"from": "bot", "value": "x"}]},
     "field 'conversations[1].from': unknown role 'bot'"),
    ({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": {"text": "x"}}]},
     "field 'conversations[1].value' must be a string or a list of text parts, got dict"),
    ({"prompt": [user("hi")], "completion": [bot("x")]}, "field 'prompt' must be a string, got list; conversational"),
    ({"prompt": "p", "completion": ""}, "field 'completion' is empty"),
    ({"text": 3}, "field 'text' must be a string, got int"),
    ({"text": ""}, "field 'text' is empty"),
]


@pytest.mark.parametrize("record, message", BAD, ids=[m[:40] for _, m in BAD])
def test_bad_records_are_one_line_errors_naming_file_record_and_field(tmp_path, llama2, record, message):
    first = {"messages": CHAT, "sharegpt": SHAREGPT, "completion": COMPLETION, "text": TEXT}[
        detect(record, Fields.parse("zh"))]  # a good first record of the same format
    path = write_jsonl(tmp_path / "d.jsonl", [first, record])
    with pytest.raises(DataError) as error:
        load(path, llama2)
    text = str(error.value)
    assert text.startswith(f"{path}: record 1 (line 2): ") and message in text and "\n" not in text, text


def test_skip_counts_every_bad_record_and_keeps_the_good_ones(tmp_path, llama2):
    bad = [record for record, _ in BAD if "messages" in record]
    path = write_jsonl(tmp_path / "d.jsonl", [CHAT, *bad, CHAT])
    examples, stats = load(path, llama2, on_bad_record="skip")
    assert len(examples) == 2 and stats.skipped.count == len(bad)
    assert stats.formats["messages"].records == 2


def test_a_conversation_ending_with_a_user_turn_is_fine_when_training_on_everything(tmp_path, llama2):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": [user("hi"), bot("hello"), user("and?")]}])
    [example], _ = load(path, llama2, train_on="all")
    assert example.turns[-1][0] == "user"


def test_a_file_whose_records_disagree_is_an_error_naming_file_and_record(tmp_path, llama2):
    path = write_jsonl(tmp_path / "d.jsonl", [CHAT, CHAT, COMPLETION])
    with pytest.raises(DataError, match=r"d.jsonl: record 2 \(line 3\): this record looks like a completion record "
                                        r"\(keys: completion, prompt\), but the file's records are messages records "
                                        r"\(from record 0\)"):
        load(path, llama2)
    path = write_jsonl(tmp_path / "e.jsonl", [CHAT, {"msgs": []}])
    with pytest.raises(DataError, match=r"record 1 \(line 2\): this record matches no format \(keys: msgs\)"):
        load(path, llama2)
    # a broken first record does not decide the file's format: skipping it leaves the rest readable
    path = write_jsonl(tmp_path / "f.jsonl", [{"msgs": []}, CHAT, CHAT])
    examples, stats = load(path, llama2, on_bad_record="skip")
    assert len(examples) == 2 and stats.skipped.count == 1


def test_content_parts_of_text_are_joined():
    messages = normalize_messages([{"role": "user", "content": [{"type": "text", "text": "Look:"},
                                                                {"type": "text", "text": "twice"}]}], "req")
    assert messages == [{"role": "user", "content": "Look:\ntwice"}]


def test_sharegpt_system_key_and_role_names(tmp_path, llama2):
    record = {"system": "Be kind.", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}
    [example], _ = load(write_jsonl(tmp_path / "d.jsonl", [record]), llama2)
    assert [role for role, _, _ in example.turns] == ["system", "user", "assistant"]
