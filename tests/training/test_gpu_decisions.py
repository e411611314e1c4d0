"""The GPU-side decisions of a training run, checked on the CPU with stand-ins for ``torch.cuda``.

* under torchrun each process makes its own GPU current before any other CUDA call, plans with that GPU's free
  memory, and a process without a GPU of its own is refused; the processes agree on the memory figure;
* ``--precision auto`` is bf16 from compute capability 8.0 and fp16 before it (bf16 is emulated there);
* several GPUs without torchrun: one GPU, never ``nn.DataParallel``;
* DeepSpeed: the loss is checked before backward (its engine steps inside backward), skip-step is refused, a full
  fine-tune saves the fp32 master weights;
* QLoRA computes and stores its 4-bit weights in the training dtype, and keeps the embedding/head there;
* attention implementations that cannot train here are refused in one line.
"""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch
from torch import nn
from transformers import Trainer, TrainingArguments

from elmtune.training import TrainError, TrainOptions, plan, recipe
from elmtune.training.safety import AtomicCheckpointTrainer, NonFiniteError, NonFiniteGuard
from tests.helpers import tiny_model, tiny_run_inputs


class FakeCuda:
    """``torch.cuda`` queries answered as on a machine with ``count`` GPUs of ``capability``; calls recorded."""

    def __init__(self, monkeypatch, count: int = 2, capability: tuple[int, int] = (9, 0)):
        self.calls: list[tuple[str, object]] = []
        self.current = 0
        cuda = torch.cuda
        monkeypatch.setattr(cuda, "is_available", lambda: True)
        monkeypatch.setattr(cuda, "device_count", lambda: count)
        monkeypatch.setattr(cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(cuda, "get_device_name", lambda device=None: "Stand-in GPU")
        monkeypatch.setattr(cuda, "set_device", self.set_device)
        monkeypatch.setattr(cuda, "current_device", lambda: self.current)
        monkeypatch.setattr(cuda, "mem_get_info", self.mem_get_info)

    def set_device(self, device) -> None:
        self.current = torch.device(device).index
        self.calls.append(("set_device", self.current))

    def mem_get_info(self, device=None) -> tuple[int, int]:
        index = self.current if device is None else torch.device(device).index
        self.calls.append(("mem_get_info", index))
        return 60 << 30, 80 << 30


@pytest.fixture
def inputs(tmp_path):
    return tiny_run_inputs(tmp_path, 24)


def options(inputs, tmp_path, **overrides) -> TrainOptions:
    model_dir, data = inputs
    return TrainOptions(**{**dict(model=str(model_dir), data=[str(data)], fields="zh", output_dir=str(tmp_path / "o"),
                                  max_length=32, batch_size=4, grad_accum=1, max_steps=2, lora_r=4, lora_alpha=8,
                                  dry_run=True), **overrides})


def as_rank(monkeypatch, rank: int, size: int) -> None:
    for name, value in (("RANK", rank), ("LOCAL_RANK", rank), ("WORLD_SIZE", size)):
        monkeypatch.setenv(name, str(value))


# ------------------------------------------------------------------------------------------ devices under torchrun


def test_each_process_makes_its_own_gpu_current_before_any_other_cuda_call(monkeypatch, inputs, tmp_path):
    gpus = FakeCuda(monkeypatch, count=2)
    as_rank(monkeypatch, 1, 2)
    planned = plan.plan_run(options(inputs, tmp_path, gradient_checkpointing="auto"))
    assert gpus.calls[0] == ("set_device", 1), gpus.calls
    assert ("mem_get_info", 1) in gpus.calls and ("mem_get_info", 0) not in gpus.calls
    assert planned["device"].startswith("cuda:1 (Stand-in GPU)")
    assert "60.0 GiB available" in planned["gradient_checkpointing"]


def test_a_process_without_a_gpu_of_its_own_is_refused(monkeypatch, inputs, tmp_path):
    gpus = FakeCuda(monkeypatch, count=2)
    as_rank(monkeypatch, 2, 3)
    with pytest.raises(TrainError, match=r"process 2 on this node has no GPU of its own \(2 GPU\(s\) here\): start "
                                         r"torchrun --nproc_per_node 2, or train on the CPUs with --device cpu"):
        recipe.setup_device(options(inputs, tmp_path))
    assert gpus.calls == []  # refused before touching any GPU


def test_a_gpu_index_is_refused_where_the_trainer_would_not_use_it(monkeypatch, inputs, tmp_path):
    FakeCuda(monkeypatch, count=2)
    with pytest.raises(TrainError, match="CUDA_VISIBLE_DEVICES=1 and --device cuda"):
        recipe.setup_device(options(inputs, tmp_path, device="cuda:1"))
    as_rank(monkeypatch, 0, 2)
    with pytest.raises(TrainError, match="each process trains on its own GPU"):
        recipe.setup_device(options(inputs, tmp_path, device="cuda:1"))


def test_device_cpu_keeps_a_run_off_the_gpus(monkeypatch, inputs, tmp_path):
    gpus = FakeCuda(monkeypatch, count=2)
    as_rank(monkeypatch, 1, 2)
    planned = plan.plan_run(options(inputs, tmp_path, device="cpu", gradient_checkpointing="auto"))
    assert planned["device"].startswith("cpu") and gpus.calls == []


@pytest.mark.parametrize("capability, expected", [((7, 5), "fp16"), ((7, 0), "fp16"), ((8, 0), "bf16"),
                                                  ((9, 0), "bf16")])
def test_auto_precision_is_native_bf16_or_fp16_with_loss_scaling(monkeypatch, inputs, tmp_path, capability,
                                                                 expected):
    FakeCuda(monkeypatch, count=1, capability=capability)
    assert plan.plan_run(options(inputs, tmp_path))["precision"] == expected


def _least_in_process(rank: int, port: int, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        with open(f"{out}.{rank}", "w") as f:
            f.write(str(plan.least_across_processes([7 << 30, 5 << 30][rank])))
    finally:
        torch.distributed.destroy_process_group()


def test_processes_plan_with_the_least_memory_any_of_them_has(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_least_in_process, args=(port, str(tmp_path / "least")), nprocs=2)
    assert [int((tmp_path / f"least.{rank}").read_text()) for rank in (0, 1)] == [5 << 30, 5 << 30]


# --------------------------------------------------------------------------------------- no DataParallel, ever


def test_several_gpus_without_torchrun_train_on_one_and_say_how_to_use_all(tmp_path, caplog):
    def args_seeing(n_gpu: int) -> TrainingArguments:
        args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
        args._n_gpu = n_gpu  # as _setup_devices sets it on a machine with n_gpu visible GPUs
        return args

    model = tiny_model()
    unguarded = Trainer(model=model, args=args_seeing(4))
    assert isinstance(unguarded._wrap_model(model), nn.DataParallel)  # what the Trainer does on its own

    args = recipe.one_gpu_per_process(args_seeing(4))
    assert args.n_gpu == 1 and args.train_batch_size == args.per_device_train_batch_size
    assert Trainer(model=model, args=args)._wrap_model(model) is model
    assert "torchrun --nproc_per_node 4 -m elmtune.cli train" in caplog.text


# ----------------------------------------------------------------------------------------------- DeepSpeed guard


class NaNLoss(nn.Module):
    def __init__(self, loss: float):
        super().__init__()
        self.w = nn.Parameter(torch.ones(2))
        self.scale = loss

    def forward(self, x, labels=None):
        return {"loss": (self.w * x).sum() * self.scale}


def test_under_deepspeed_a_nan_loss_stops_the_run_before_backward(tmp_path):
    def step(loss: float, guarded: bool):
        model = NaNLoss(loss).train()
        trainer = AtomicCheckpointTrainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True,
                                                                             report_to=[]))
        if guarded:
            trainer.loss_guard = NonFiniteGuard("stop", tmp_path)  # as the recipe sets it under DeepSpeed
        trainer.current_gradient_accumulation_steps = 1  # set by the training loop
        trainer.training_step(model, {"x": torch.ones(2)})
        return model.w.grad

    assert step(float("nan"), guarded=False).isnan().all()  # unguarded, NaN gradients reach the engine's step
    assert torch.equal(step(2.0, guarded=True), torch.full((2,), 2.0))
    with pytest.raises(NonFiniteError, match="step 1: the loss is not finite"):
        step(float("nan"), guarded=True)


def test_skip_step_is_refused_with_deepspeed_before_deepspeed_is_needed(monkeypatch, inputs, tmp_path):
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # not installed: the refusal must come first
    as_rank(monkeypatch, 0, 2)
    with pytest.raises(TrainError, match="--nan-policy skip-step cannot work with --distributed deepspeed"):
        recipe.train(options(inputs, tmp_path, distributed="deepspeed", nan_policy="skip-step", dry_run=False))
    assert not (tmp_path / "o" / "config.yaml").exists()


def test_the_gradient_guard_stands_aside_under_deepspeed(tmp_path):
    model = NaNLoss(1.0)
    model.w.grad = torch.full((2,), float("nan"))
    args = types.SimpleNamespace(fp16=False, deepspeed={"zero_optimization": {"stage": 2}})
    NonFiniteGuard("stop", tmp_path).on_pre_optimizer_step(args, types.SimpleNamespace(global_step=0), None,
                                                           model=model)  # no raise: check_loss works there


def test_a_full_fine_tune_under_deepspeed_saves_the_fp32_master_weights(monkeypatch, tmp_path):
    """DeepSpeed (bf16) holds a 16-bit module and fp32 masters in ZeRO's partitions: the saved model takes each
    trained weight from its master and each frozen one from the starting model, never the 16-bit module."""
    from elmtune.models.loading import load_model
    from elmtune.training.full import set_trainable

    base, _ = tiny_run_inputs(tmp_path, 1)
    start = load_model(str(base))
    model = load_model(str(base))
    set_trainable(model, ["!transformer.token_embeddings.*"])
    torch.manual_seed(0)  # "trained": masters moved by less than bf16 can hold, the module cast to bf16
    masters = {id(p): p.detach() + 1e-4 * torch.randn_like(p) for p in model.parameters() if p.requires_grad}
    model.to(torch.bfloat16)
    utils = types.ModuleType("deepspeed.utils")
    utils.safe_get_full_fp32_param = lambda p: masters[id(p)]
    monkeypatch.setitem(sys.modules, "deepspeed", types.ModuleType("deepspeed"))
    monkeypatch.setitem(sys.modules, "deepspeed.utils", utils)
    trainer = types.SimpleNamespace(model=model, is_fsdp_enabled=False, is_deepspeed_enabled=True,
                                    is_world_process_zero=lambda: True)
    run = types.SimpleNamespace(trainer=trainer, options=types.SimpleNamespace(model=str(base), seed=0))
    saved = recipe.full_state_dict(run)
    for name, p in model.named_parameters():
        expected = masters[id(p)] if p.requires_grad else start.state_dict()[name]
        assert saved[name].dtype == torch.float32 and torch.equal(saved[name], expected), name
        assert not torch.equal(p.float(), expected)  # the module's bf16 copy would have lost it
    assert recipe.full_state_dict(types.SimpleNamespace(trainer=types.SimpleNamespace(
        is_fsdp_enabled=False, is_deepspeed_enabled=False))) is None  # one process / DDP: the module itself


# ------------------------------------------------------------------------------------------------------ QLoRA


def test_qlora_computes_and_stores_in_the_training_dtype(monkeypatch, inputs, tmp_path):
    FakeCuda(monkeypatch, count=1, capability=(7, 5))
    monkeypatch.setitem(sys.modules, "bitsandbytes", types.ModuleType("bitsandbytes"))
    monkeypatch.setattr("transformers.utils.import_utils.is_bitsandbytes_available", lambda *a, **k: True)
    for dtype in (torch.float16, torch.bfloat16):
        config = recipe._bnb_4bit_config(options(inputs, tmp_path, quantize="4bit"), dtype)
        assert config.bnb_4bit_compute_dtype == dtype and config.bnb_4bit_quant_storage == dtype
        assert config.load_in_4bit and config.bnb_4bit_quant_type == "nf4"


@pytest.mark.parametrize("tied", [True, False])
def test_qlora_keeps_the_embedding_and_head_in_the_compute_dtype(tied):
    from peft import prepare_model_for_kbit_training

    model = tiny_model(share_input_output_layers=tied).to(torch.bfloat16)
    model.is_loaded_in_4bit = True  # what a bitsandbytes load sets; prepare_* then upcasts what is not quantized
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    assert model.get_input_embeddings().weight.dtype == torch.float32  # the upcast this undoes
    recipe.keep_embeddings_in(model, torch.bfloat16)
    heads = [model.get_input_embeddings()] + ([] if tied else [model.get_output_embeddings()])
    assert all(m.weight.dtype == torch.bfloat16 for m in heads)
    assert model.transformer.norm.weight.dtype == torch.float32  # norms stay in fp32


# --------------------------------------------------------------------------------------------- attention kernels


@pytest.mark.parametrize("impl, message", [
    ("flash_attention_2", "--attn-implementation flash_attention_2 runs on CUDA GPUs only"),
    ("flash_attention_3", "--attn-implementation flash_attention_3 runs on CUDA GPUs only"),
    ("flex_attention", "--attn-implementation flex_attention has no backward pass on cpu")])
def test_attention_that_cannot_train_on_the_cpu_is_refused(inputs, tmp_path, impl, message):
    with pytest.raises(TrainError, match=message):
        recipe.check_attention(options(inputs, tmp_path, attn_implementation=impl), torch.device("cpu"))


def test_flash_attention_without_its_package_names_what_to_install(monkeypatch, inputs, tmp_path):
    monkeypatch.setattr("transformers.utils.is_flash_attn_2_available", lambda: False)
    with pytest.raises(TrainError, match=r"needs the flash-attn package .*pip install flash-attn"):
        recipe.check_attention(options(inputs, tmp_path, attn_implementation="flash_attention_2"),
                               torch.device("cuda", 0))


def test_the_cli_refuses_flash_attention_here_in_one_line(inputs, tmp_path):
    import subprocess

    from tests.helpers import REPO_ROOT

    model_dir, data = inputs
    result = subprocess.run([sys.executable, "-m", "elmtune.cli", "train", "--model", str(model_dir), "--data",
                             str(data), "--fields", "zh", "-o", str(tmp_path / "o"), "--device", "cpu",
                             "--attn-implementation", "flash_attention_2"],
                            capture_output=True, text=True, cwd=REPO_ROOT)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].endswith("runs on CUDA GPUs only (training here on cpu); "
                                                           "use sdpa (the default)")


# ------------------------------------------------------------------------------------------------------- FSDP2


def test_fsdp_on_cpu_processes_is_refused_rather_than_run_unsharded(monkeypatch, inputs, tmp_path):
    as_rank(monkeypatch, 0, 2)  # accelerate enables FSDP only for GPU processes: on CPUs it would be DDP
    with pytest.raises(TrainError, match="--distributed fsdp shards the model across CUDA GPUs only; these "
                                         "processes train on cpu, where it would run as plain DDP"):
        recipe.train(options(inputs, tmp_path, distributed="fsdp", device="cpu"))


def test_fsdp_is_configured_as_fsdp2_with_fp32_lora_reduction(tmp_path):
    config = recipe.distributed_arguments(TrainOptions(distributed="fsdp"))
    assert config["fsdp"] is True and config["fsdp_config"]["version"] == 2
    assert "use_orig_params" not in json.dumps(config)  # an FSDP1 option FSDP2 ignores
    plugin = types.SimpleNamespace(mixed_precision_policy=None)
    trainer = types.SimpleNamespace(accelerator=types.SimpleNamespace(state=types.SimpleNamespace(fsdp_plugin=plugin)))
    recipe.fsdp_mixed_precision(trainer, torch.bfloat16)
    assert (plugin.mixed_precision_policy.param_dtype, plugin.mixed_precision_policy.reduce_dtype) == (
        torch.bfloat16, torch.float32)
