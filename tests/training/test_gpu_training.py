"""Training on CUDA GPUs (skipped, with the reason, where there is none; run by scripts/gpu-check.sh).

* a bf16 run follows the fp32 run of the same recipe, with fp32 LoRA weights;
* QLoRA (bitsandbytes) trains, computing in the training dtype with the embedding/head kept in it;
* two GPUs under torchrun (DDP, FSDP2 with a sharded base, and FSDP2 full fine-tuning) train what one GPU trains
  with the same global batch.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from peft import PeftModel

from elmtune.training import TrainOptions, finish, setup, train
from tests.helpers import tiny_model, tiny_run_inputs
from tests.training.test_distributed import adapter, assert_same, train_cli

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return tiny_run_inputs(tmp_path_factory.mktemp("gpu-train"), 48)


def run_options(inputs, out, **overrides) -> TrainOptions:
    model_dir, data = inputs
    return TrainOptions(**{**dict(model=str(model_dir), data=[str(data)], fields="zh", output_dir=str(out),
                                  max_length=48, batch_size=8, grad_accum=1, lr=1e-2, max_steps=6, save_steps=100,
                                  logging_steps=1, lora_r=8, lora_alpha=16, lora_dropout=0.0, device="cuda",
                                  gradient_checkpointing="off"), **overrides})


def losses(out) -> list[float]:
    import json

    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


def test_a_bf16_run_on_the_gpu_follows_the_fp32_run(inputs, tmp_path):
    plan = train(run_options(inputs, tmp_path / "plan", dry_run=True))
    assert plan["device"].startswith("cuda:0") and plan["precision"] in ("bf16", "fp16")
    train(run_options(inputs, tmp_path / "fp32", precision="fp32"))
    train(run_options(inputs, tmp_path / "bf16", precision="bf16"))
    exact, low = losses(tmp_path / "fp32"), losses(tmp_path / "bf16")
    assert len(exact) == len(low) == 6
    assert low[-1] < low[0]  # it learns
    for a, b in zip(exact, low):
        assert abs(a - b) <= 0.03 * abs(a) + 0.02, (exact, low)
    weights = adapter(tmp_path / "bf16")
    assert all(w.dtype == torch.float32 for w in weights.values())  # LoRA weights stay fp32 under bf16 compute


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="QLoRA needs bitsandbytes")
def test_qlora_trains_in_the_training_dtype_with_the_head_kept_there(inputs, tmp_path):
    run = setup(run_options(inputs, tmp_path / "qlora", quantize="4bit", precision="bf16", max_steps=3))
    try:
        base = run.model.get_base_model()
        assert base.get_input_embeddings().weight.dtype == torch.bfloat16
        quantized = [m for m in base.modules() if type(m).__name__ == "Linear4bit"]
        assert quantized and all(m.compute_dtype == torch.bfloat16 for m in quantized)
        assert all(m.weight.dtype == torch.bfloat16 for m in quantized)  # quant storage: shardable by FSDP
        run.trainer.train()
        summary = finish(run)
    finally:
        run.close()
    assert torch.isfinite(torch.tensor([summary["first_loss"], summary["last_loss"]])).all()


two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")


@two_gpus
def test_two_gpus_under_torchrun_train_what_one_gpu_trains(inputs, tmp_path):
    directory = inputs[0].parent
    train_cli(directory, tmp_path / "one", "--batch-size", "4", "--device", "cuda")
    train_cli(directory, tmp_path / "ddp", "--batch-size", "2", "--device", "cuda", nproc=2)
    assert_same(adapter(tmp_path / "one"), adapter(tmp_path / "ddp"), atol=1e-4)


@two_gpus
def test_fsdp2_on_two_gpus_trains_what_one_gpu_trains_and_stock_peft_loads_it(inputs, tmp_path):
    directory = inputs[0].parent
    train_cli(directory, tmp_path / "one", "--batch-size", "4", "--device", "cuda")
    train_cli(directory, tmp_path / "fsdp", "--batch-size", "2", "--device", "cuda", "--distributed", "fsdp", nproc=2)
    assert_same(adapter(tmp_path / "one"), adapter(tmp_path / "fsdp"), atol=1e-4)
    model = PeftModel.from_pretrained(tiny_model(), tmp_path / "fsdp").eval()
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 5, 6, 7]])).logits).all()


@two_gpus
def test_full_fine_tuning_under_fsdp2_on_two_gpus_trains_what_one_gpu_trains(inputs, tmp_path):
    """--method full: fp32 master weights sharded over two GPUs; the output, gathered from the shards, is the
    whole model in Apple's layout (fp32), equal to one GPU's run with the same global batch."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    def weights(out):
        return {k: v for f in sorted(out.glob("model*.safetensors")) for k, v in load_file(f).items()}

    directory = inputs[0].parent
    common = ("--method", "full", "--lr", "1e-3", "--device", "cuda")
    train_cli(directory, tmp_path / "one", *common, "--batch-size", "4")
    train_cli(directory, tmp_path / "fsdp", *common, "--batch-size", "2", "--distributed", "fsdp", nproc=2)
    one, fsdp = weights(tmp_path / "one"), weights(tmp_path / "fsdp")
    base = tiny_model().state_dict()
    assert fsdp.keys() == one.keys() == base.keys()
    assert all(fsdp[k].shape == base[k].shape and fsdp[k].dtype == torch.float32 for k in base)  # gathered, whole
    assert_same(one, fsdp, atol=1e-4)
    assert not torch.equal(fsdp["transformer.token_embeddings.weight"], base["transformer.token_embeddings.weight"])
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "fsdp").eval()
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 5, 6, 7]])).logits).all()
