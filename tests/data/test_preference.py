"""Preference records (``train --method dpo|orpo``): tokenized as supervised training tokenizes prompts and answers,
bad records as one-line errors, and ``data inspect`` of pairs."""

from __future__ import annotations

import json

import pytest

from elmtune.cli import main
from elmtune.data import DataError, DataSpec, load_examples, render_prompt
from elmtune.data.preference import load_pairs
from tests.helpers import shared_path, write_jsonl


def spec(**overrides) -> DataSpec:
    return DataSpec.parse(overrides.pop("template", "openelm-sep"), "zh", overrides.pop("max_length", 128),
                          **overrides)


def test_a_prompt_string_is_rendered_as_an_alpaca_instruction(tmp_path, llama2):
    pairs, stats = load_pairs([write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "Name a colour", "chosen": "Blue.", "rejected": "Seven."}])], llama2, spec())
    [pair] = pairs
    # the same ids as supervised training gives the alpaca record with that instruction and each answer
    for answer, ids in (("Blue.", pair.chosen_ids), ("Seven.", pair.rejected_ids)):
        [example], _ = load_examples([write_jsonl(tmp_path / f"a{answer}.jsonl", [
            {"instruction": "Name a colour", "input": "", "output": answer}])], llama2, spec())
        assert pair.prompt_ids + ids == example.input_ids
    assert pair.prompt_ids[0] == llama2.bos_id and pair.chosen_ids[-1] == llama2.eos_id
    assert stats.kept == 1 and stats.formats["preference"].records == 1
    # the alpaca template applies too
    [with_alpaca], _ = load_pairs([str(tmp_path / "p.jsonl")], llama2, spec(template="alpaca"))
    assert llama2.hf.decode(with_alpaca.prompt_ids).endswith("### Response:\n")


def test_messages_are_rendered_with_the_chat_template_as_inference_renders_them(tmp_path, llama2):
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Capital of France?"}]
    records = [{"messages": conversation, "chosen": "Paris.", "rejected": "Lyon."},
               # answers as an assistant message, or a list holding one; the conversation under TRL's "prompt" key
               {"prompt": conversation, "chosen": {"role": "assistant", "content": "Paris."},
                "rejected": [{"role": "assistant", "content": "Lyon."}]}]
    for chat_template in ("openelm", "chatml"):
        pairs, stats = load_pairs([write_jsonl(tmp_path / "m.jsonl", records)], llama2,
                                  spec(chat_template=chat_template))
        first, second = pairs
        assert first.features() == second.features()
        assert first.prompt_ids == render_prompt(conversation, llama2, chat_template).input_ids
        # the answer: what supervised training supervises in that assistant turn (content and end token)
        [example], _ = load_examples([write_jsonl(tmp_path / "c.jsonl", [
            {"messages": conversation + [{"role": "assistant", "content": "Paris."}]}])], llama2,
            spec(chat_template=chat_template, train_on="last-turn"))
        supervised = [t for t, label in zip(example.input_ids, example.labels) if label != -100]
        assert first.chosen_ids == supervised
        assert example.input_ids[:len(first.prompt_ids)] == first.prompt_ids
        assert stats.formats["preference-chat"].records == 2


def test_long_pairs_are_cut_and_a_prompt_filling_max_length_is_dropped(tmp_path, llama2):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a b", "chosen": "one two three four five six seven",
                                               "rejected": "no"},
                                              {"prompt": "word " * 40, "chosen": "x", "rejected": "y"}])
    [pair], stats = load_pairs([path], llama2, spec(max_length=8))
    assert len(pair.prompt_ids) + len(pair.chosen_ids) == 8 and pair.longest == 8
    assert pair.rejected_ids[-1] == llama2.eos_id  # the short answer is whole
    assert stats.truncated == 1 and stats.dropped_all_masked == 1 and stats.kept == 1


@pytest.mark.parametrize("record, message", [
    ({"prompt": "p", "rejected": "r"}, "missing field 'chosen'"),
    ({"prompt": "p", "chosen": "c"}, "missing field 'rejected'"),
    ({"prompt": "p", "chosen": "same", "rejected": "same"}, "fields 'chosen' and 'rejected' are identical"),
    ({"prompt": "p", "chosen": 3, "rejected": "r"}, "field 'chosen' must be a string or an assistant message, got int"),
    ({"prompt": "p", "chosen": "c", "rejected": ["r"]}, "field 'rejected[0]' must be an object"),
    ({"prompt": "p", "chosen": [{"role": "user", "content": "c"}], "rejected": "r"},
     "field 'chosen' must hold one assistant message (the answer), has: user"),
    ({"prompt": "p", "chosen": "", "rejected": "r"}, "field 'chosen' is empty"),
    ({"prompt": 5, "chosen": "c", "rejected": "r"}, "field 'prompt' must be a string or a list of messages, got int"),
    ({"prompt": " ", "chosen": "c", "rejected": "r"}, "field 'prompt' is empty"),
    ({"chosen": "c", "rejected": "r"}, "missing field 'prompt' or 'messages'"),
    ({"prompt": "p", "messages": [{"role": "user", "content": "q"}], "chosen": "c", "rejected": "r"},
     "both 'prompt' and 'messages' given"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "chosen": "c",
      "rejected": "r"}, "field 'messages' ends with an assistant turn"),
])
def test_bad_records_are_one_line_errors_naming_file_record_and_field(tmp_path, llama2, record, message):
    good = {"prompt": "p", "chosen": "c", "rejected": "r"}
    path = write_jsonl(tmp_path / "bad.jsonl", [good, record])
    with pytest.raises(DataError) as error:
        load_pairs([path], llama2, spec())
    text = str(error.value)
    assert text.startswith(f"{path}: record 1 (line 2): ") and message in text and "\n" not in text
    # --on-bad-record skip: counted, the good record kept
    pairs, stats = load_pairs([path], llama2, spec(), on_bad_record="skip")
    assert len(pairs) == 1 and stats.skipped.count == 1 and message in stats.skipped.examples[0]


def test_supervised_training_refuses_preference_records_naming_the_method(tmp_path, llama2):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "p", "chosen": "c", "rejected": "r"}])
    with pytest.raises(DataError, match=r"p.jsonl: record 0 \(line 1\): a preference record .*--method dpo or orpo"):
        load_examples([path], llama2, spec())


def test_inspect_shows_pairs_and_writes_their_ids(tmp_path, capsys):
    tokenizer = str(shared_path("data", "llama2-tokenizer"))
    data = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "Name a colour", "chosen": "Blue.", "rejected": "Seven."},
        {"messages": [{"role": "user", "content": "Capital of France?"}], "chosen": "Paris.", "rejected": "Lyon."},
        {"prompt": "Bad", "chosen": "same", "rejected": "same"}])
    output = tmp_path / "pairs.jsonl"
    code = main(["data", "inspect", "--data", data, "--tokenizer", tokenizer, "--on-bad-record", "skip",
                 "--output", str(output)])
    assert code == 0
    out = capsys.readouterr().out
    assert "preference pairs (prompt, chosen, rejected)" in out
    assert "chosen │ ⟦ Blue.</s>⟧" in out and "rejected │ ⟦ Seven.</s>⟧" in out
    assert "pairs kept           2" in out and "bad records skipped  1" in out and "are identical" in out
    assert "preference-chat" in out
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1] and set(rows[0]) == {"file", "index", "prompt_ids", "chosen_ids",
                                                                     "rejected_ids"}
    # a bad pair without skip: one line, exit 2
    code = main(["data", "inspect", "--data", data, "--tokenizer", tokenizer])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and f"{data}: record 2 (line 3): fields 'chosen' and 'rejected'" in err
