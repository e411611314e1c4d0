"""``elmtune data inspect``: what exactly will the model be trained on?"""

from __future__ import annotations

import json

import pytest

from elmtune.cli import main
from tests.helpers import shared_path


def test_inspect_reports_and_writes_what_training_sees(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    records = [{"en_instruction": "Say hi", "en_input": "", "en_output": "hi"},
               {"en_instruction": "x" * 2000, "en_input": "", "en_output": "cut away"},
               {"en_instruction": "Bad", "en_input": "", "en_output": 3}]
    data.write_text("\n".join(json.dumps(r) for r in records))
    output = tmp_path / "seen.jsonl"
    code = main(["data", "inspect", "--data", str(data), "--tokenizer", str(shared_path("data", "llama2-tokenizer")),
                 "--max-length", "64", "--on-bad-record", "skip", "--output", str(output)])
    assert code == 0
    out = capsys.readouterr().out
    assert "⟦ hi</s>⟧" in out  # the answer and its eos are the supervised part
    assert "examples kept        1" in out and "dropped, no answer   1" in out and "bad records skipped  1" in out
    assert "field 'en_output' must be a string" in out
    [line] = output.read_text().splitlines()
    row = json.loads(line)
    assert row["file"] == str(data) and row["index"] == 0
    assert row["labels"][-1] == 2 and row["input_ids"][0] == 1 and len(row["attention_mask"]) == len(row["input_ids"])


def test_inspect_errors_are_one_line_with_exit_2(tmp_path, capsys):
    data = tmp_path / "d.json"
    data.write_text('[{"en_instruction": "a", "en_output": "b"}]')
    code = main(["data", "inspect", "--data", str(data), "--tokenizer", str(shared_path("data", "llama2-tokenizer"))])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert f"{data}: record 0: missing field 'en_input'" in err


def test_inspect_shows_conversations_turn_by_turn_with_per_format_statistics(tmp_path, capsys):
    chat = tmp_path / "chat.jsonl"
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
                    {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "用中文？"},
                    {"role": "assistant", "content": "巴黎。"}]
    chat.write_text(json.dumps({"messages": conversation}, ensure_ascii=False) + "\n", encoding="utf-8")
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([{"instruction": "Say hi", "input": "", "output": "hi"}]))
    output = tmp_path / "seen.jsonl"
    tokenizer = str(shared_path("data", "llama2-tokenizer"))
    code = main(["data", "inspect", "--data", str(chat), "--data", str(alpaca), "--tokenizer", tokenizer,
                 "--fields", "zh", "--output", str(output)])
    assert code == 0
    out = capsys.readouterr().out
    assert "conversations: chat template 'openelm', training on all-assistant" in out
    assert "messages, 5 turns" in out
    lines = out.splitlines()
    assert "     system │ <s> Be brief." in lines and "  assistant │ ⟦ Paris.</s>⟧" in lines
    assert "       user │  Capital of France?<sep>" in lines and "  assistant │ ⟦ 巴黎。</s>⟧" in lines
    assert "⟦ hi</s>⟧" in out  # the alpaca record as before
    table = out[out.index("per format:"):]
    assert "  alpaca" in table and "  messages          1       1         0       0      5" in table
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert [set(r) for r in rows] == [{"file", "index", "input_ids", "attention_mask", "labels"}] * 2
    assert [r["file"] for r in rows] == [str(chat), str(alpaca)]

    main(["data", "inspect", "--data", str(chat), "--tokenizer", tokenizer, "--train-on", "last-turn"])
    out = capsys.readouterr().out
    assert "  assistant │  Paris.</s>" in out.splitlines() and "  assistant │ ⟦ 巴黎。</s>⟧" in out.splitlines()


def test_inspect_refuses_bad_data_options_in_one_line(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n')
    tokenizer = str(shared_path("data", "llama2-tokenizer"))
    code = main(["data", "inspect", "--data", str(data), "--tokenizer", tokenizer, "--chat-template", "nope"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--chat-template 'nope': not a template name" in err
    with pytest.raises(SystemExit) as exit_:
        main(["data", "inspect", "--data", str(data), "--tokenizer", tokenizer, "--format", "csv"])
    assert exit_.value.code == 2 and "invalid choice: 'csv'" in capsys.readouterr().err
    code = main(["data", "inspect", "--data", str(data), "--tokenizer", tokenizer, "--format", "text"])
    assert code == 2 and "record 0 (line 1): missing field 'text'" in capsys.readouterr().err
