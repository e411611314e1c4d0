"""Reading data files: every bad input is a one-line error naming file, record and field — or a counted skip."""

from __future__ import annotations

import json

import pytest

from elmtune.data import DataError, DataSpec, load_examples, read_records
from elmtune.data.records import SkipLog
from tests.helpers import word_tokenizer

GOOD = {"instruction": "Say hi", "input": "", "output": "hi"}


def write(path, content: str | bytes):
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return str(path)


def load(path, on_bad_record="error", fields="zh"):
    return load_examples([path], word_tokenizer(), DataSpec.parse("openelm-sep", fields, 64), on_bad_record)


@pytest.mark.parametrize("name, content, message", [
    ("broken.json", '[{"instruction": "a", "input": "", "output": "b"},\n {"instruction": ', "invalid JSON at line 2"),
    ("object.json", json.dumps(GOOD), "found a single object"),
    ("scalar.json", "42", "expected a JSON array of records, found int"),
    ("empty.json", "", "the file is empty"),
    ("blank.jsonl", "  \n\n \t\n", "the file is empty"),
    ("latin1.json", b'[{"instruction": "caf\xe9", "input": "", "output": "x"}]', r"not valid UTF-8 \(byte 21, line 1\)"),
    ("dupe.json", '[{"instruction": "a", "instruction": "b", "input": "", "output": "c"}]', "key 'instruction' twice"),
    ("notes.txt", "hello", "unsupported file type .txt"),
])
def test_whole_file_problems(tmp_path, name, content, message):
    path = write(tmp_path / name, content)
    with pytest.raises(DataError, match=message) as error:
        load(path)
    assert str(error.value).startswith(path) and "\n" not in str(error.value)


def test_truncated_jsonl_line_names_the_line(tmp_path):
    path = write(tmp_path / "d.jsonl", json.dumps(GOOD) + "\n" + '{"instruction": "x", "inp' + "\n")
    with pytest.raises(DataError, match=r"d.jsonl: line 2: invalid JSON at column \d+"):
        load(path)


@pytest.mark.parametrize("record, message", [
    ({"instruction": "a", "input": ""}, "record 1: missing field 'output'"),
    ({"instruction": "a", "input": "", "output": 7}, "record 1: field 'output' must be a string, got int"),
    ({"instruction": ["a"], "input": "", "output": "b"}, "record 1: field 'instruction' must be a string, got list"),
])
def test_record_problems_name_file_record_and_field(tmp_path, record, message):
    path = write(tmp_path / "d.json", json.dumps([GOOD, record]))
    with pytest.raises(DataError, match=message):
        load(path)


def test_skip_counts_bad_records_and_keeps_the_rest(tmp_path):
    lines = [json.dumps(GOOD), "{broken", json.dumps({"instruction": "a"}), "[1, 2]", json.dumps(GOOD)]
    path = write(tmp_path / "d.jsonl", "\n".join(lines))
    examples, stats = load(path, on_bad_record="skip")
    assert len(examples) == 2 and stats.skipped.count == 3
    reasons = " | ".join(stats.skipped.examples)
    assert "line 2: invalid JSON" in reasons and "line 4: expected a JSON object" in reasons
    assert "record 2 (line 3): missing field 'input'" in reasons


def test_bom_and_null_input_are_accepted(tmp_path):
    path = write(tmp_path / "d.json", b"\xef\xbb\xbf" + json.dumps([{**GOOD, "input": None}]).encode())
    examples, _ = load(path)
    assert len(examples) == 1


def test_directory_reads_files_in_natural_order(tmp_path):
    for i in (10, 2, 1):
        write(tmp_path / f"part_{i}.json", json.dumps([{**GOOD, "output": f"answer {i}"}]))
    (tmp_path / "README.md").write_text("not data")
    sources = [r.source for r in read_records([str(tmp_path)])]
    assert [s.rsplit("/", 1)[1] for s in sources] == ["part_1.json", "part_2.json", "part_10.json"]


def test_empty_directory_and_missing_path(tmp_path):
    with pytest.raises(DataError, match="no .json or .jsonl files"):
        load(str(tmp_path))
    with pytest.raises(DataError, match="no such file or directory"):
        load(str(tmp_path / "missing.json"))


def test_saved_datasets_folder(tmp_path):
    from datasets import Dataset

    Dataset.from_list([GOOD, {**GOOD, "output": "hello"}]).save_to_disk(str(tmp_path / "ds"))
    records = list(read_records([str(tmp_path / "ds")]))
    assert [r.values["output"] for r in records] == ["hi", "hello"]


def test_skip_log_keeps_count_beyond_examples():
    log = SkipLog()
    for i in range(8):
        log.add(f"reason {i}")
    assert log.count == 8 and len(log.examples) == 5
