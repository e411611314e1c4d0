"""Encoding records into supervised examples, as the tutorial's process_func — reproduced record for record."""

from __future__ import annotations

import json
from collections import defaultdict

import pytest

from elmtune.data import IGNORE_INDEX, DataSpec, Fields, Template
from elmtune.data.encode import EncodeStats, encode_records
from elmtune.data.records import DataError, Record
from tests.helpers import shared_path, word_tokenizer


@pytest.mark.parametrize("fields", ["en", "zh"])
def test_golden_tokenization_is_identical_record_for_record(llama2, fields):
    golden_file = shared_path("golden", "tokenization", f"{fields}.jsonl")
    data_dir = shared_path("data", "alpaca-chinese")
    golden = [json.loads(line) for line in golden_file.read_text().splitlines()]
    files: dict[str, list] = defaultdict(list)
    records = []
    for g in golden:
        if g["file"] not in files:
            files[g["file"]] = json.loads((data_dir / g["file"]).read_text(encoding="utf-8"))
        records.append(Record(g["file"], g["index"], files[g["file"]][g["index"]]))
    stats = EncodeStats()
    examples = encode_records(records, llama2, DataSpec.parse("openelm-sep", fields, 384), stats)
    assert len(examples) == len(golden)
    for example, g in zip(examples, golden):
        assert (example.source, example.index) == (g["file"], g["index"])
        assert example.features() == {k: g[k] for k in ("input_ids", "attention_mask", "labels")}, (g["file"], g["index"])
    assert stats.truncated > 0  # the golden set includes records cut at 384 tokens


def test_layout_prompt_masked_answer_and_eos_supervised():
    tok = word_tokenizer()
    [example] = encode_records([Record("f", 0, {"instruction": "say", "input": "hi", "output": "hello"})], tok,
                               DataSpec.parse("openelm-sep", "zh", 64), EncodeStats())
    prompt = [tok.bos_id] + tok.encode(["sayhi<sep>"])[0]
    answer = tok.encode(["hello"])[0]
    assert example.input_ids == prompt + answer + [tok.eos_id]
    assert example.labels == [IGNORE_INDEX] * len(prompt) + answer + [tok.eos_id]
    assert tok.pad_id == tok.eos_id  # pad = eos, as in the tutorial ... and the eos label above is still kept


def test_examples_with_no_answer_left_are_dropped_and_counted():
    tok = word_tokenizer()
    long_prompt = {"instruction": " ".join(["hello"] * 40), "input": "", "output": "hi"}
    fits = {"instruction": "say", "input": "", "output": "hi"}
    stats = EncodeStats()
    examples = encode_records([Record("f", 0, long_prompt), Record("f", 1, fits)], tok,
                              DataSpec.parse("openelm-sep", "zh", 16), stats)
    assert [e.index for e in examples] == [1]
    assert stats.dropped_all_masked == 1 and stats.kept == 1
    assert all(any(label != IGNORE_INDEX for label in e.labels) for e in examples)


def test_truncation_keeps_the_head_like_the_tutorial():
    tok = word_tokenizer()
    record = {"instruction": "say", "input": "", "output": " ".join(["hello"] * 30)}
    stats = EncodeStats()
    [example] = encode_records([Record("f", 0, record)], tok, DataSpec.parse("openelm-sep", "zh", 10), stats)
    full = [tok.bos_id] + tok.encode(["say<sep>"])[0] + tok.encode([record["output"]])[0] + [tok.eos_id]
    assert example.input_ids == full[:10] and stats.truncated == 1


def test_alpaca_and_custom_templates():
    alpaca = Template.parse("alpaca")
    assert alpaca.prompt("Add", "1 2").endswith("### Instruction:\nAdd\n\n### Input:\n1 2\n\n### Response:\n")
    assert "### Input" not in alpaca.prompt("Add")
    custom = Template.parse("Q: {instruction} {input}\nA:")
    assert custom.name == "custom" and custom.prompt("why", "now") == "Q: why now\nA:"
    with pytest.raises(ValueError, match="must|containing"):
        Template.parse("no placeholder")
    with pytest.raises(ValueError, match="only {instruction} and {input}"):
        Template.parse("{instruction} {answer}")


def test_field_mappings():
    assert Fields.parse("en") == Fields("en_instruction", "en_input", "en_output")
    assert Fields.parse("instruction=q,output=a") == Fields("q", None, "a")
    with pytest.raises(ValueError, match="--fields"):
        Fields.parse("question=q")
    with pytest.raises(DataError, match="missing field 'a'"):
        Fields.parse("instruction=q,output=a").extract(Record("f.json", 3, {"q": "x"}))
