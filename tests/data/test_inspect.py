"""``elmtune data inspect``: what exactly will the model be trained on?"""

from __future__ import annotations

import json

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
