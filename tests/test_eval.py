"""``elmtune eval`` on conversation data: the answer is the last assistant turn, prompted with everything before
it under the adapter's chat template; completion records too; text records are refused in one line."""

from __future__ import annotations

import json
import math

from elmtune.cli import main
from elmtune.data import render_prompt
from elmtune.evaluate import run_eval
from elmtune.tokenizer import load_tokenizer
from tests.helpers import WORD_CHAT_TEMPLATE, train_chat_adapter, write_conversations


def test_eval_on_conversations_prompts_with_the_chat_template(tmp_path, capsys):
    _, adapter = train_chat_adapter(tmp_path, chat_template=WORD_CHAT_TEMPLATE)
    heldout = write_conversations(tmp_path / "heldout.jsonl", 4)
    extra = tmp_path / "more.jsonl"  # other formats beside it: an alpaca record (a one-turn chat here), a completion
    extra.write_text(json.dumps({"instruction": "say", "input": " x", "output": "x"}) + "\n")
    completion = tmp_path / "completion.jsonl"
    completion.write_text(json.dumps({"prompt": "say a", "completion": " a"}) + "\n")
    report = run_eval([str(heldout), str(extra), str(completion)], str(adapter), str(tmp_path / "eval"),
                      fields="zh", max_new_tokens=3)
    assert report["n"] == 6
    tok = load_tokenizer(str(adapter))
    records = [json.loads(line) for line in heldout.read_text().splitlines()]
    samples = report["adapter_model"]["samples"]
    for record, sample in zip(records, samples):
        *before, answer = record["messages"]
        assert sample["prompt"] == render_prompt(before, tok, WORD_CHAT_TEMPLATE).text
        assert sample["prompt"].startswith("<s>z answer ") and sample["prompt"].endswith(" hello ")
        assert sample["reference"] == answer["content"]
    assert samples[4] == {**samples[4], "prompt": "<s>hi say x hello ", "reference": "x"}
    for model in ("base", "adapter_model"):
        assert math.isfinite(report[model]["loss"]) and 0 <= report[model]["rouge_l"] <= 1
    assert report["adapter_model"]["loss"] < report["base"]["loss"]  # it learned the answers' shape

    text = tmp_path / "text.jsonl"
    text.write_text(json.dumps({"text": "a b c"}) + "\n")
    capsys.readouterr()
    assert main(["eval", "-a", str(adapter), "--data", str(text), "-o", str(tmp_path / "e2")]) == 2
    [error] = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert "record 0" in error and "a text record has no answer to compare with" in error
