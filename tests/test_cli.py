"""The command line front door."""

from __future__ import annotations

import subprocess
import sys

from elmtune.cli import main


def test_help_lists_commands(capsys):
    assert main([]) == 0
    assert "info" in capsys.readouterr().out


def test_info_counts_a_preset_without_weights(capsys):
    assert main(["info", "openelm-3b"]) == 0
    out = capsys.readouterr().out
    assert "3,036,647,424" in out and "query_heads: [12, 12, 12, 12, 16" in out


def test_bad_model_is_a_one_line_error_with_exit_2(capsys, tmp_path):
    assert main(["info", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no config.json" in err and str(tmp_path) in err


def test_golden_checkpoint_loads_with_stock_auto_class_in_a_fresh_interpreter(golden_dir):
    code = ("import elmtune, transformers; "
            f"m = transformers.AutoModelForCausalLM.from_pretrained({str(golden_dir)!r}); "
            "print(type(m).__module__, type(m).__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "elmtune.models.openelm OpenELMForCausalLM"


def test_generate_merge_export_from_the_command_line(tmp_path, capsys):
    import json

    from tests.helpers import train_tiny_adapter

    _, adapter = train_tiny_adapter(tmp_path, lora_targets=["qkv_proj", "out_proj", "proj_1", "proj_2"])
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"instruction": "say", "input": "a b", "output": "ignored"}\n{"prompt": "say"}\n')
    out = tmp_path / "out.jsonl"
    assert main(["generate", "-a", str(adapter), "--prompts", str(prompts), "-o", str(out),
                 "--max-new-tokens", "5"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["saya b<sep>", "say<sep>"]
    assert all({"output", "prompt_tokens", "completion_tokens", "finish_reason"} <= set(r) for r in rows)
    assert main(["generate", "-a", str(adapter), "-p", "x", "-p", "y", "--input", "z"]) == 2
    assert main(["generate", "-a", str(adapter)]) == 2
    assert "nothing to generate" in capsys.readouterr().err

    assert main(["merge", str(adapter), "-o", str(tmp_path / "merged")]) == 0
    assert main(["export", "gguf", str(tmp_path / "merged"), "-o", str(tmp_path / "m.gguf"), "--type", "q8_0"]) == 0
    assert (tmp_path / "m.gguf").stat().st_size > 0
    assert main(["merge", str(adapter), "-o", str(tmp_path / "merged")]) == 2  # not empty, no --overwrite


def test_generate_answers_conversations_with_the_adapters_chat_template(tmp_path, capsys):
    import json

    from elmtune.data import render_prompt
    from elmtune.tokenizer import load_tokenizer
    from tests.helpers import WORD_CHAT_TEMPLATE, train_chat_adapter

    _, adapter = train_chat_adapter(tmp_path, chat_template=WORD_CHAT_TEMPLATE)
    conversation = [{"role": "system", "content": "answer a"}, {"role": "user", "content": "say a b"},
                    {"role": "assistant", "content": "c"}, {"role": "user", "content": "say d"}]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"messages": conversation}) + "\n"
                       + json.dumps({"conversations": [{"from": "human", "value": "say x"}]}) + "\n"
                       + json.dumps({"instruction": "say", "input": " y"}) + "\n")
    out = tmp_path / "out.jsonl"
    assert main(["generate", "-a", str(adapter), "--prompts", str(prompts), "--fields", "zh", "-o", str(out),
                 "--max-new-tokens", "3"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["<s>z answer a hi say a b hello c</s>hi say d hello ", "<s>hi say x hello ",
                                           "<s>hi say y hello "]
    expected = render_prompt(conversation, load_tokenizer(str(adapter)), WORD_CHAT_TEMPLATE)
    assert rows[0]["prompt_tokens"] == len(expected.input_ids)
    capsys.readouterr()
    assert main(["generate", "-a", str(adapter), "-p", "say", "--chat-template", "chatml", "--max-new-tokens", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["prompt"].startswith("<|im_start|>user\nsay<|im_end|>")
    assert main(["generate", "-a", str(adapter), "-p", "say", "--chat-template", "nope"]) == 2
    assert main(["generate", "-a", str(adapter), "-p", ""]) == 2  # an empty turn, as in training
    prompts.write_text(json.dumps({"messages": [{"role": "robot", "content": "x"}]}) + "\n")
    assert main(["generate", "-a", str(adapter), "--prompts", str(prompts)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("elmtune generate: error:")]
    assert len(errors) == 3 and "--chat-template 'nope': not a template name" in errors[0]
    assert "prompt: the instruction is empty" in errors[1] and "unknown role 'robot'" in errors[2]
