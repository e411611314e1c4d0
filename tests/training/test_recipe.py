"""The training recipe: the tutorial's numbers through our code path, outputs, resume, validation, plans."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from elmtune.options import OptionsError, resolve
from elmtune.training import TrainError, TrainOptions, finish, setup, train
from tests.helpers import (WORD_CHAT_TEMPLATE, REPO_ROOT, Interrupt, save_tiny_base, shared_path, stop_at,
                           write_conversations)


@pytest.fixture
def tiny_run(tmp_path):
    """A tiny model directory (with its tokenizer) and 48 records of data, all in tmp_path."""
    model_dir = save_tiny_base(tmp_path / "model")
    words = "a b c d e f g h x y z".split()
    records = [{"instruction": "say", "input": " ".join(words[i % 11:i % 11 + 3]), "output": words[(i * 7) % 11]}
               for i in range(48)]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    return model_dir, data


def options(model_dir, data, out, **overrides) -> TrainOptions:
    base = dict(model=str(model_dir), data=[str(data)], fields="zh", output_dir=str(out), max_length=32,
                batch_size=4, grad_accum=2, lr=1e-2, max_steps=6, save_steps=2, logging_steps=1,
                precision="fp32", gradient_checkpointing="off", lora_r=4, lora_alpha=8)
    return TrainOptions(**{**base, **overrides})


def test_tutorial_first_batch_loss_through_the_training_path(tmp_path):
    golden_dir = shared_path("golden", "openelm", "tiny")
    golden = json.loads((golden_dir / "golden.json").read_text())["tutorial_first_batch"]
    common = dict(model=str(golden_dir), tokenizer=str(shared_path("data", "llama2-tokenizer")),
                  data=[str(shared_path("data", "alpaca-chinese", "alpaca_chinese_part_0.json"))], precision="fp32")
    # the tutorial's own path: padded batches, full-vocabulary logits
    run = setup(TrainOptions(output_dir=str(tmp_path / "tutorial"), packing=False, full_logits=True, **common))
    features = [e.features() for e in run.train_examples[:8]]
    batch = run.trainer.data_collator(features)
    for key in ("input_ids", "attention_mask", "labels"):
        assert batch[key].tolist() == golden[key], key
    run.model.eval()
    with torch.no_grad():
        loss = run.trainer.compute_loss(run.model, batch)
    assert abs(loss.item() - golden["loss"]) <= 1e-5
    # elmtune's default path (packed row, supervised-only logits) gives the same loss on the same examples
    fast = setup(TrainOptions(output_dir=str(tmp_path / "default"), **common))
    packed = fast.trainer.data_collator(features)
    assert packed["input_ids"].shape == (1, sum(golden["attention_mask"][i].count(1) for i in range(8)))
    fast.model.eval()
    with torch.no_grad():
        assert abs(fast.trainer.compute_loss(fast.model, packed).item() - golden["loss"]) <= 1e-5


def test_outputs_and_stock_peft_loading(tiny_run, tmp_path):
    model_dir, data = tiny_run
    out = tmp_path / "out"
    summary = train(options(model_dir, data, out, val_size=8.0, eval_steps=3))
    assert summary["global_step"] == 6 and "eval_loss" in summary
    for name in ("adapter_config.json", "adapter_model.safetensors", "config.yaml", "elmtune.json", "metrics.jsonl",
                 "loss.png", "tokenizer.model", "checkpoints/checkpoint-6/optimizer.pt"):
        assert (out / name).exists(), name
    meta = json.loads((out / "elmtune.json").read_text())
    assert meta["template"]["name"] == "openelm-sep" and meta["fields"]["output"] == "output"
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2, 3, 4, 5, 6]
    assert any("eval_perplexity" in m for m in metrics)
    # Stock PEFT on a freshly loaded base gives the adapter back, and the adapter is not a no-op.
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    with torch.no_grad():
        plain = base(ids).logits
        adapted = PeftModel.from_pretrained(base, out).eval()(ids).logits
    assert (adapted - plain).abs().max() > 1e-3


def run_recording_batches(opts, callbacks=()):
    """train() with the micro-batches each optimizer step saw recorded (by wrapping the collator)."""
    run = setup(opts, callbacks)
    seen = []
    collate = run.trainer.data_collator
    run.trainer.data_collator = lambda features: seen.append([f["input_ids"] for f in features]) or collate(features)
    try:
        run.trainer.train(resume_from_checkpoint=run.resume_from)
    except Interrupt:
        return run, seen, None
    else:
        return run, seen, finish(run)
    finally:
        run.close()


def test_resume_continues_from_the_checkpoint(tiny_run, tmp_path):
    model_dir, data = tiny_run
    _, full_batches, _ = run_recording_batches(options(model_dir, data, tmp_path / "full"))
    interrupted = tmp_path / "interrupted"
    _, first_batches, _ = run_recording_batches(options(model_dir, data, interrupted), [stop_at(3)])
    assert (interrupted / "checkpoints" / "checkpoint-2").is_dir()
    with pytest.raises(TrainError, match="already holds a run"):
        setup(options(model_dir, data, interrupted))
    run, rest_batches, _ = run_recording_batches(options(model_dir, data, interrupted, resume="auto"))
    assert run.resume_from.endswith("checkpoint-2")
    assert run.trainer.state.global_step == 6
    # step 3 was lost with the crash; the resumed run re-reads exactly the batches from step 3 on
    per_step = 2  # grad_accum micro-batches per optimizer step
    assert rest_batches == full_batches[2 * per_step:]
    assert first_batches[:2 * per_step] == full_batches[:2 * per_step]
    a = load_file(tmp_path / "full" / "adapter_model.safetensors")
    b = load_file(interrupted / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bitwise: RNG and optimizer restored


def test_loss_falls_on_real_alpaca_records_with_the_llama2_tokenizer(tmp_path):
    train(TrainOptions(
        model=str(shared_path("golden", "openelm", "tiny")), tokenizer=str(shared_path("data", "llama2-tokenizer")),
        data=[str(shared_path("data", "alpaca-chinese", "alpaca_chinese_part_3.json"))], output_dir=str(tmp_path),
        max_steps=12, batch_size=4, grad_accum=1, lr=2e-3, logging_steps=1, max_length=128, precision="fp32",
        save_steps=100))
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5, losses


def test_dry_run_plans_the_3b_recipe_without_allocating_weights(tmp_path):
    command = [sys.executable, "-c", "import resource, sys; from elmtune.cli import main; rc = main(sys.argv[1:]); "
               "print('maxrss_kb', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(rc)",
               "train", "--model", "openelm-3b", "--tokenizer", str(shared_path("data", "llama2-tokenizer")),
               "--data", str(shared_path("data", "alpaca-chinese", "alpaca_chinese_part_0.json")),
               "--output-dir", str(tmp_path / "plan"), "--dry-run"]
    out = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, check=True).stdout
    assert "parameters_trainable: 45,883,392" in out
    assert "parameters_total: 3,082,530,816" in out
    assert "steps_per_epoch: 32" in out  # 1,000 examples / (8 × 4)
    rss_gb = int(out.split("maxrss_kb")[1].split()[0]) / 2**20
    assert rss_gb < 2.0, f"dry run used {rss_gb:.1f} GB: weights were allocated"  # fp32 3B would be 12 GB


def test_yaml_config_precedence_and_errors(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("lr: 0.0003\nlora_r: 16\nbatch_size: 2\n")
    opts = resolve(TrainOptions, yaml_path=config, flags={"lr": 0.001})
    assert (opts.lr, opts.lora_r, opts.batch_size, opts.grad_accum) == (0.001, 16, 2, 4)  # flag > YAML > default
    config.write_text("learning_rate: 0.1\n")
    with pytest.raises(OptionsError, match=r"run.yaml: unknown option 'learning_rate'"):
        resolve(TrainOptions, yaml_path=config)
    config.write_text("lora_r: sixteen\n")
    with pytest.raises(OptionsError, match=r"run.yaml: option 'lora_r': expected an integer"):
        resolve(TrainOptions, yaml_path=config)
    config.write_text("precision: fp8\n")
    with pytest.raises(OptionsError, match="'fp8' is not one of auto, bf16, fp16, fp32"):
        resolve(TrainOptions, yaml_path=config)


def test_cli_writes_the_resolved_config_and_refuses_bad_setups(tiny_run, tmp_path):
    from elmtune.cli import main

    model_dir, data = tiny_run
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {model_dir}\ndata: [{data}]\nfields: zh\nmax_steps: 1\nlora_r: 4\n"
                      "batch_size: 4\ngrad_accum: 1\nprecision: fp32\nmax_length: 32\n")
    out = tmp_path / "out"
    assert main(["train", "-c", str(config), "-o", str(out), "--lora-r", "2"]) == 0
    import yaml

    written = yaml.safe_load((out / "config.yaml").read_text())
    assert written["lora_r"] == 2 and written["max_steps"] == 1 and written["lr"] == 1e-4
    assert main(["train", "-c", str(config), "-o", str(out)]) == 2  # holds a run already


def test_train_takes_the_data_format_options_and_saves_the_chat_template(tmp_path, capsys):
    """`elmtune train --format/--chat-template/--train-on` shape the examples (the plan and the run) and land in
    elmtune.json with the template's Jinja source, which inference reads back."""
    from elmtune.cli import main
    from elmtune.data import DataSpec, load_examples
    from elmtune.data.chat import ChatTemplate, chat_template_for_adapter
    from elmtune.tokenizer import load_tokenizer

    model_dir = save_tiny_base(tmp_path / "model")
    data = write_conversations(tmp_path / "chat.jsonl", 16)
    template = tmp_path / "chat.jinja"
    template.write_text(WORD_CHAT_TEMPLATE)
    common = ["--model", str(model_dir), "--data", str(data), "--max-length", "64", "--lora-r", "4",
              "--batch-size", "4", "--grad-accum", "1", "--precision", "fp32", "--max-steps", "1"]
    assert main(["train", *common, "-o", str(tmp_path / "forced"), "--format", "text", "--dry-run"]) == 2
    assert "chat.jsonl: record 0 (line 1): missing field 'text'" in capsys.readouterr().err  # --format: the plan
    out = tmp_path / "out"
    assert main(["train", *common, "-o", str(out), "--format", "messages", "--chat-template", str(template),
                 "--train-on", "last-turn"]) == 0
    meta = json.loads((out / "elmtune.json").read_text())
    assert {k: meta[k] for k in ("format", "formats", "train_on")} == {
        "format": "messages", "formats": {"messages": 16}, "train_on": "last-turn"}
    assert meta["chat_template"] == {"name": f"file:{template}", "source": WORD_CHAT_TEMPLATE}
    tok = load_tokenizer(str(out))
    assert chat_template_for_adapter(meta, tok) == ChatTemplate(f"file:{template}", WORD_CHAT_TEMPLATE)
    # the run encoded what these options say: last turns only, under that template
    spec = DataSpec.parse("openelm-sep", "en", 64, "messages", str(template), "last-turn")
    examples, stats = load_examples([str(data)], tok, spec)
    assert meta["data"]["supervised_tokens"] == stats.supervised_tokens
    all_turns = load_examples([str(data)], tok, DataSpec.parse("openelm-sep", "en", 64, "messages", str(template)))
    assert stats.supervised_tokens < all_turns[1].supervised_tokens


@pytest.mark.parametrize("variant", [{"use_dora": True}, {"use_rslora": True}])
def test_lora_variants_train_and_save(tiny_run, tmp_path, variant):
    model_dir, data = tiny_run
    out = tmp_path / "out"
    train(options(model_dir, data, out, max_steps=2, **variant))
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert all(adapter_config[k] == v for k, v in variant.items())
    if "use_dora" in variant:
        assert any("lora_magnitude_vector" in k for k in load_file(out / "adapter_model.safetensors"))


def test_val_file_and_tensorboard(tiny_run, tmp_path):
    model_dir, data = tiny_run
    out = tmp_path / "out"
    summary = train(options(model_dir, data, out, max_steps=2, val_file=str(data), tensorboard=True))
    assert summary["eval_loss"] > 0
    assert list((out / "tensorboard").rglob("events.out.tfevents.*"))


def test_qlora_without_gpu_is_a_clear_error(tiny_run, tmp_path):
    model_dir, data = tiny_run
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(TrainError, match="needs a CUDA GPU"):
        train(options(model_dir, data, tmp_path / "q", quantize="4bit"))


def test_offline_hub_id_says_how_to_download(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from elmtune.hub import HubError

    with pytest.raises(HubError, match=r"could not download .* `hf download apple/OpenELM-270M --local-dir DIR`"):
        train(TrainOptions(model="apple/OpenELM-270M", tokenizer="x", data=["y"], output_dir=str(tmp_path)))


@pytest.mark.parametrize("asked", ["on", "auto"])
def test_selective_checkpointing_is_used_only_where_measured_faster_than_full(tiny_run, tmp_path, monkeypatch, asked):
    """``on`` (or ``auto`` when only checkpointing fits) measures selective against full on this machine and trains
    with the faster; the reason names the measurement."""
    from elmtune.training import checkpointing, plan
    from elmtune.training.checkpointing import checkpointing_mode

    model_dir, data = tiny_run
    if asked == "auto":  # memory for selective but not for keeping everything
        def fits_only_checkpointing(config, n_params, n_trainable, tokens, precision, mode, *rest, **extra):
            return {"total": {"off": 10 << 30, "on": 1 << 20, "full": 1 << 19}[mode]}
        monkeypatch.setattr(plan, "estimate_memory", fits_only_checkpointing)
        monkeypatch.setattr(plan, "available_memory", lambda device=None: 1 << 30)
    for times, expected in (({"on": 1.0, "full": 2.0}, "on"), ({"on": 2.0, "full": 1.0}, "full")):
        monkeypatch.setattr(checkpointing, "measured_modes", lambda *a, times=times, **k: times)
        run = setup(options(model_dir, data, tmp_path / f"{asked}-{expected}", gradient_checkpointing=asked))
        try:
            assert checkpointing_mode(run.model) == expected
        finally:
            run.close()
