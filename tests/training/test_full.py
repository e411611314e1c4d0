"""``--method full``: the model's own weights trained (all, or those ``--trainable`` selects), with the same
recipe as LoRA, and written as a complete checkpoint in Apple's layout."""

from __future__ import annotations

import functools
import json
import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from elmtune.options import OptionsError, resolve, write_yaml
from elmtune.training import TrainOptions, finish, setup, train
from elmtune.training.full import TrainableError, trainable_names
from tests.helpers import Interrupt, shared_path, stop_at, tiny_model, tiny_run_inputs, word_tokenizer


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return tiny_run_inputs(tmp_path_factory.mktemp("full"), 40)


def options(inputs, out, **overrides) -> TrainOptions:
    base_dir, data = inputs
    base = dict(model=str(base_dir), data=[str(data)], fields="zh", output_dir=str(out), max_length=32,
                batch_size=4, grad_accum=2, lr=1e-3, max_steps=4, save_steps=2, logging_steps=1, precision="fp32",
                gradient_checkpointing="off", method="full", device="cpu")
    return TrainOptions(**{**base, **overrides})


def weights(directory) -> dict:
    files = sorted(directory.glob("model*.safetensors"))
    assert files, f"no weights in {directory}"
    return {k: v for f in files for k, v in load_file(f).items()}


def test_method_option_and_the_use_dora_alias(tmp_path):
    assert TrainOptions(use_dora=True).method == "dora"
    assert TrainOptions(method="dora").use_dora is False  # an input alias: method says it
    assert TrainOptions().method == "lora" and TrainOptions().use_dora is False
    with pytest.raises(OptionsError, match="--use-dora means --method dora"):
        TrainOptions(use_dora=True, method="full")
    with pytest.raises(OptionsError, match="--trainable chooses the weights --method full trains"):
        TrainOptions(trainable=["transformer.*"])
    with pytest.raises(OptionsError, match="cannot quantize"):
        TrainOptions(method="full", quantize="4bit")
    # a dora run's saved config.yaml, read back with --config: a --method flag still wins over the file
    write_yaml(TrainOptions(use_dora=True), tmp_path / "config.yaml")
    for method in ("lora", "full"):
        assert resolve(TrainOptions, yaml_path=tmp_path / "config.yaml", flags={"method": method}).method == method
    assert resolve(TrainOptions, yaml_path=tmp_path / "config.yaml").method == "dora"


def test_loss_falls_on_real_alpaca_records_and_stock_loading_reproduces_the_logits(tmp_path):
    """A tiny OpenELM with Llama-2's vocabulary and tokenizer on real alpaca records."""
    records = json.loads(shared_path("data", "alpaca-chinese", "alpaca_chinese_part_3.json").read_text())[:16]
    data = tmp_path / "alpaca.json"
    data.write_text(json.dumps(records, ensure_ascii=False))
    base_dir = tmp_path / "base"
    tiny_model(vocab_size=32000).save_pretrained(base_dir)  # Llama-2's vocabulary
    out = tmp_path / "out"
    run = setup(TrainOptions(
        model=str(base_dir), tokenizer=str(shared_path("data", "llama2-tokenizer")),
        data=[str(data)], output_dir=str(out), method="full", max_steps=12, batch_size=4, grad_accum=1, lr=1e-3,
        logging_steps=1, max_length=96, precision="fp32", save_steps=100, device="cpu"))
    try:
        run.trainer.train()
        summary = finish(run)
    finally:
        run.close()
    assert summary["method"] == "full"
    losses = [m["loss"] for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in m]
    assert len(losses) == 12
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.5, losses  # 3 passes over the same 16 records

    # a complete checkpoint in Apple's layout: Apple's config keys, safetensors, tokenizer, elmtune.json
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["OpenELMForCausalLM"] and config["torch_dtype"] == "float32"
    assert "dtype" not in config and "_name_or_path" not in config
    assert (out / "tokenizer.model").is_file() and not (out / "adapter_config.json").exists()
    meta = json.loads((out / "elmtune.json").read_text())
    assert meta["method"] == "full" and meta["template"]["name"] == "openelm-sep"
    assert not (out / ".staging").exists()

    trained = run.model.eval()
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([run.train_examples[0].input_ids[:48]])
    with torch.no_grad():
        a, b = trained(ids).logits, loaded(ids).logits
    assert a.dtype == b.dtype == torch.float32
    assert (a - b).abs().max() <= 1e-5
    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    with torch.no_grad():
        assert (base(ids).logits - b).abs().max() > 1e-2  # training changed the model


def test_resume_after_an_interruption_is_bitwise_equal(inputs, tmp_path):
    full = tmp_path / "full"
    train(options(inputs, full))
    # the same run, interrupted during step 3 (after its step-2 checkpoint)
    interrupted = tmp_path / "interrupted"
    with pytest.raises(Interrupt):
        train(options(inputs, interrupted), [stop_at(3)])
    assert not list(interrupted.glob("model*.safetensors"))
    assert (interrupted / "checkpoints" / "checkpoint-2" / "model.safetensors").is_file()
    run = setup(options(inputs, interrupted, resume="auto"))
    try:
        assert run.resume_from.endswith("checkpoint-2")
        run.trainer.train(resume_from_checkpoint=run.resume_from)
        finish(run)
    finally:
        run.close()
    a, b = weights(full), weights(interrupted)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bitwise: RNG and optimizer restored


def test_trainable_patterns_freeze_what_they_say(inputs, tmp_path):
    base_dir, _ = inputs
    before = weights(base_dir)
    out = tmp_path / "out"
    patterns = ["transformer.layers.1.*", "transformer.norm.*", "!transformer.layers.1.attn.*"]
    summary = train(options(inputs, out, trainable=patterns, max_steps=2))
    assert summary["global_step"] == 2
    after = weights(out)
    assert after.keys() == before.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    expected = {k for k in before if (k.startswith("transformer.layers.1.") and ".attn." not in k)
                or k.startswith("transformer.norm.")}
    assert changed == expected, sorted(changed ^ expected)
    assert "transformer.token_embeddings.weight" not in changed  # the tied embedding / head stays frozen


def test_trainable_pattern_semantics_and_errors():
    model = tiny_model()
    names = [n for n, _ in model.named_parameters()]
    assert trainable_names(model, []) == names
    frozen_embedding = trainable_names(model, ["!transformer.token_embeddings.*"])
    assert frozen_embedding == [n for n in names if n != "transformer.token_embeddings.weight"]
    assert trainable_names(model, ["*.qkv_proj.weight"]) == [n for n in names if n.endswith("qkv_proj.weight")]
    with pytest.raises(TrainableError, match="'qkv_proj' matches no parameter"):
        trainable_names(model, ["qkv_proj"])  # whole names: a bare module name is a typo, not a suffix
    with pytest.raises(TrainableError, match="every parameter would be frozen"):
        trainable_names(model, ["!*"])


def test_a_pattern_matching_nothing_stops_the_run_before_training(inputs, tmp_path):
    with pytest.raises(TrainableError, match="matches no parameter"):  # a ValueError: a one-line CLI error
        setup(options(inputs, tmp_path / "out", trainable=["transformer.layer.*"]))


def test_selective_checkpointing_under_full(inputs, tmp_path):
    """fp32: the policy still finds the (now trainable) projections and gives off's gradients; 16-bit autocast
    multiplies by copies it cannot recognise, so `on` falls back to `full` (with a warning)."""
    from elmtune.training.checkpointing import SelectivePolicy, enable_checkpointing, selective_unsupported
    from elmtune.training.plan import decide_checkpointing

    assert selective_unsupported("none", "ddp", 1, "full", "bf16")
    assert selective_unsupported("none", "ddp", 1, "full", "fp32") is None
    opts = options(inputs, tmp_path / "x", gradient_checkpointing="on", precision="bf16")
    mode, why = decide_checkpointing(opts, tiny_model().config, 0, 10, 32, "bf16")
    assert mode == "full" and "autocast" in why

    grads = {}
    ids = torch.randint(3, 90, (1, 24))
    for mode in ("off", "on"):
        model = tiny_model().train()
        enable_checkpointing(model, mode)
        kept = []
        if mode == "on":  # count what the policy keeps: it must recognise the projections' matmuls
            layer = model.transformer.layers[0]
            policy = layer._gradient_checkpointing_func.keywords["context_fn"]
            assert isinstance(policy, SelectivePolicy)
            addresses = {m.weight.data_ptr() for m in policy.projections}
            kept = [p for p in model.parameters() if p.data_ptr() in addresses]
            assert len(kept) == 6  # qkv_proj, out_proj, proj_2 of both layers, all trainable
            assert all(p.requires_grad for p in kept)
        model(ids, labels=ids).loss.backward()
        grads[mode] = {n: p.grad.clone() for n, p in model.named_parameters()}
    for name in grads["off"]:
        assert torch.allclose(grads["off"][name], grads["on"][name], atol=1e-6), name


def test_dry_run_counts_every_weight_with_gradients_and_adamw_state(inputs, tmp_path):
    plan = train(options(inputs, tmp_path / "plan", dry_run=True))
    lora = train(options(inputs, tmp_path / "plan", dry_run=True, method="lora", lora_r=4))
    total = sum(p.numel() for p in tiny_model().parameters())
    assert plan["method"] == "full" and plan["parameters_trainable"] == plan["parameters_total"] == total
    memory = plan["estimated_memory_gib"]
    assert memory["trainable_grads_adamw"] == round(16 * total / 2**30, 2)
    assert memory["weights"] == 0  # nothing frozen
    assert plan["memory_fits"].startswith("yes")
    assert plan["estimated_disk_gib"] > lora["estimated_disk_gib"]
    frozen = train(options(inputs, tmp_path / "plan", dry_run=True, trainable=["!transformer.token_embeddings.*"]))
    assert frozen["parameters_trainable"] == total - 96 * 64


def test_estimates_for_full_training():
    from elmtune.training.plan import estimate_disk, estimate_memory

    config = tiny_model().config
    full = estimate_memory(config, 0, 1_000_000, 64, "bf16", "full", full=True)
    assert full["trainable_grads_adamw"] == 16_000_000 and full["autocast_copies"] == 2_000_000
    half_frozen = estimate_memory(config, 500_000, 500_000, 64, "bf16", "full", full=True)
    assert half_frozen["weights"] == 4 * 500_000  # frozen weights are fp32 too
    need, what = estimate_disk(500_000, 10, 5, None, n_saved=1_000_000)
    slack = 2 << 20
    assert need == 2 * (4 * 1_000_000 + 8 * 500_000 + slack) + 4 * 1_000_000 + slack and "the model" in what


@pytest.mark.slow  # ~40 s: three processes start and import torch
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_two_ranks_equal_one_process_with_the_same_global_batch(inputs, tmp_path):
    from tests.training.test_distributed import train_cli

    directory = inputs[0].parent
    train_cli(directory, tmp_path / "single", "--method", "full", "--lr", "1e-3", "--batch-size", "4")
    ddp = train_cli(directory, tmp_path / "ddp", "--method", "full", "--lr", "1e-3", "--batch-size", "2", nproc=2)
    assert "model written to" in ddp.stdout
    a, b = weights(tmp_path / "single"), weights(tmp_path / "ddp")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5), (key, (a[key] - b[key]).abs().max())
    assert json.loads((tmp_path / "ddp" / "elmtune.json").read_text())["world_size"] == 2


def test_the_output_loads_like_a_base_model_for_generate_and_export(inputs, tmp_path):
    import gguf

    from elmtune.export_gguf import export_gguf
    from elmtune.inference import SamplingOptions, generate, load_pipeline

    out = tmp_path / "out"
    train(options(inputs, out, max_steps=2))
    pipeline = load_pipeline(model=str(out), dtype="float32", device="cpu")
    completions = generate(pipeline, ["say", "say a b"], sampling=SamplingOptions(max_new_tokens=4, temperature=0))
    assert len(completions) == 2
    trained = weights(out)
    net = pipeline.model
    assert torch.equal(net.transformer.token_embeddings.weight, trained["transformer.token_embeddings.weight"])
    gguf_path = tmp_path / "model.gguf"
    export_gguf(str(out), str(gguf_path), "f32", device="cpu")
    assert len(gguf.GGUFReader(gguf_path).tensors) > 0


@pytest.mark.slow  # three `elmtune train` processes: ~50 s of CPU time (100 s wall on a busy 2-core machine)
def test_sigkill_then_resume_gives_the_bitwise_same_model(inputs, tmp_path):
    """A real `elmtune train --method full` process killed with SIGKILL after its step-10 checkpoint, then
    `--resume auto`: every weight equal, bit for bit, to the uninterrupted run's."""
    import signal
    import subprocess

    from elmtune.training.safety import MANIFEST
    from tests.helpers import REPO_ROOT
    from tests.training.test_safety import command, wait_for

    def full_run(out, *extra):
        return command(inputs, out, "--method", "full", "--lr", "1e-3", "--max-steps", "30", *extra)

    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    subprocess.run(full_run(tmp_path / "full"), check=True, capture_output=True, cwd=REPO_ROOT, env=env)
    killed = tmp_path / "killed"
    process = subprocess.Popen(full_run(killed), cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    wait_for(killed / "checkpoints" / "checkpoint-10" / MANIFEST, process)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    assert not list(killed.glob("model*.safetensors"))  # killed before the end: no model written
    resumed = subprocess.run(full_run(killed, "--resume", "auto"), capture_output=True, text=True, cwd=REPO_ROOT,
                             env=env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "model written to" in resumed.stdout and "after 30 steps" in resumed.stdout
    logged = [m["step"] for m in map(json.loads, (killed / "metrics.jsonl").read_text().splitlines()) if "loss" in m]
    assert logged.count(5) == 1 and logged.count(30) == 1, logged  # resumed from a checkpoint, not started over
    a, b = weights(tmp_path / "full"), weights(killed)
    assert a.keys() == b.keys() and len(a) > 10
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    base = weights(inputs[0])
    assert not torch.equal(a["transformer.token_embeddings.weight"], base["transformer.token_embeddings.weight"])


# --------------------------------------------------------------------------- chat, eval and serve on a full output
# Each loads the output directory as a base model (no adapter) and must give the greedy tokens of the trained
# model loaded with stock AutoModelForCausalLM, from the prompt ids training put before an answer.

@pytest.fixture(scope="module")
def full_output(inputs, tmp_path_factory):
    """A tiny full fine-tune (2 steps) of a base whose vocabulary is the word tokenizer's (every generated id
    decodes to a word: text comparisons are exact); barely trained, so greedy answers run the full length."""
    directory = tmp_path_factory.mktemp("full-out")
    base = directory / "base"
    tiny_model(vocab_size=48).save_pretrained(base)
    word_tokenizer().save(base)
    train(options((base, inputs[1]), directory / "out", max_steps=2))
    return directory / "out"


@functools.lru_cache(maxsize=1)
def stock_model(out):
    """The trained model as stock transformers loads it (after ``import elmtune``)."""
    return AutoModelForCausalLM.from_pretrained(out).eval()


def stock_greedy(out, prompt_ids: list[int], max_new_tokens: int, repetition_penalty: float = 1.0) -> list[int]:
    """The greedy continuation of ``prompt_ids`` by stock transformers, cut at eos."""
    from elmtune.tokenizer import load_tokenizer

    eos = load_tokenizer(str(out)).eos_id
    model = stock_model(out)
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        new = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens,
                             repetition_penalty=repetition_penalty, eos_token_id=eos, pad_token_id=eos,
                             top_k=None, top_p=None, temperature=None)[0, len(prompt_ids):].tolist()
    return new[: new.index(eos)] if eos in new else new


def test_elmtune_chat_on_a_full_output_answers_as_stock_transformers(full_output, monkeypatch):
    import elmtune.chat
    from elmtune.cli import main
    from elmtune.tokenizer import load_tokenizer
    from tests.helpers import trained_prefix

    sessions, written, generated = [], [], []
    lines = iter(["say a b", "/quit"])
    loop = elmtune.chat.chat_loop

    def scripted(session):  # the real loop on the session the command built, reading the lines above
        sessions.append(session)
        model = session.pipeline.model
        generate = model.generate
        model.generate = lambda *a, **k: (generated.append(generate(*a, **k)), generated[-1])[1]
        return loop(session, read=lambda _: next(lines), write=written.append)

    monkeypatch.setattr(elmtune.chat, "chat_loop", scripted)
    assert main(["chat", "--model", str(full_output), "--max-new-tokens", "8", "--repetition-penalty", "1.0",
                 "--device", "cpu", "--dtype", "float32"]) == 0
    [session] = sessions
    assert not hasattr(session.pipeline.model, "disable_adapter")  # the directory itself, no adapter
    user = {"role": "user", "content": "say a b"}
    assert session.prompt_ids == trained_prefix(full_output, [user, {"role": "assistant", "content": "x"}])
    expected = stock_greedy(full_output, session.prompt_ids, 8)
    assert len(expected) == 8  # no early eos: eight greedy tokens to compare
    [ids] = generated
    assert ids[0, len(session.prompt_ids):].tolist() == expected
    reply = load_tokenizer(str(full_output)).decode(expected)
    assert "".join(written).split("elm> ", 1)[1].startswith(reply)
    assert session.messages == [user, {"role": "assistant", "content": reply}]


def test_elmtune_serve_on_a_full_output_answers_as_stock_transformers(full_output):
    from fastapi.testclient import TestClient

    from elmtune.serve import build_state, create_app
    from tests.helpers import trained_prefix

    state = build_state(str(full_output), {}, device="cpu", dtype="float32")
    tok = state.tokenizer
    try:
        client = TestClient(create_app(state))
        assert client.get("/v1/models").json()["data"][0]["id"] == "out"
        messages = [{"role": "user", "content": "say a b"}]
        answer = client.post("/v1/chat/completions", json={"messages": messages, "temperature": 0, "max_tokens": 8})
        assert answer.status_code == 200, answer.text
        prompt_ids = trained_prefix(full_output, [*messages, {"role": "assistant", "content": "x"}])
        expected = stock_greedy(full_output, prompt_ids, 8)
        assert len(expected) == 8 and answer.json()["choices"][0]["message"]["content"] == tok.decode(expected)
        assert answer.json()["usage"] == {"prompt_tokens": len(prompt_ids), "completion_tokens": 8,
                                          "total_tokens": len(prompt_ids) + 8}

        tutorial = client.post("/", json={"prompt": "say", "max_new_tokens": 8})  # the tutorial's API: rep. 1.2
        assert tutorial.status_code == 200, tutorial.text
        prompt_ids = [tok.bos_id] + tok.encode(["say<sep>"])[0]  # the openelm-sep template training used
        expected = stock_greedy(full_output, prompt_ids, 8, repetition_penalty=1.2)
        assert len(expected) == 8 and tutorial.json()["response"] == tok.decode(expected)
        assert expected != stock_greedy(full_output, prompt_ids, 8)  # the penalty mattered: it was applied alike
    finally:
        state.engine.close()


# --------------------------------------------------------------------------- the memory plan under FSDP

def test_the_unit_sizes_fsdp_gathers_are_the_models():
    from elmtune.training.plan import layer_parameters, outer_parameters

    for tied in (True, False):
        model = tiny_model(share_input_output_layers=tied)
        layers = model.transformer.layers
        for i, layer in enumerate(layers):
            assert layer_parameters(model.config, i) == sum(p.numel() for p in layer.parameters())
        in_layers = sum(p.numel() for p in layers.parameters())
        assert outer_parameters(model.config) == sum(p.numel() for p in model.parameters()) - in_layers


def test_fsdp_divides_weights_gradients_and_adamw_states_among_the_processes():
    from elmtune.training.plan import estimate_memory, layer_parameters, outer_parameters

    config = tiny_model().config
    frozen, trained = 1_000_000, 3_000_000
    for full in (True, False):
        one = estimate_memory(config, frozen, trained, 64, "bf16", "off", full=full)
        four = estimate_memory(config, frozen, trained, 64, "bf16", "off", full=full, shards=4)
        assert four["weights"] == one["weights"] / 4 and four["trainable_grads_adamw"] == one["trainable_grads_adamw"] / 4
        assert four["activations"] == one["activations"]  # each process its own micro-batch
        assert "autocast_copies" not in four  # gathered in bf16 already: nothing for autocast to copy
        outer, layer = outer_parameters(config), max(layer_parameters(config, i) for i in range(2))
        assert four["gathered"] == 2 * (outer + 2 * layer) + math.ceil((outer + layer) * 6 * 0.75)
        assert four["total"] == sum(v for k, v in four.items() if k != "total")
    assert "autocast_copies" in estimate_memory(config, frozen, trained, 64, "bf16", "off", full=True)


def test_the_dry_run_under_fsdp_plans_per_process_and_says_so(inputs, tmp_path, monkeypatch):
    """OpenELM-270M (the preset, counted on the meta device: nothing allocated) with Llama-2's tokenizer."""
    import elmtune.training.recipe as recipe

    tokenizer = str(shared_path("data", "llama2-tokenizer"))

    def plan(method, **overrides):
        return train(options(inputs, tmp_path / "plan", dry_run=True, precision="bf16", model="openelm-270m",
                             tokenizer=tokenizer, method=method, gradient_checkpointing="full", **overrides))

    alone = {method: plan(method) for method in ("full", "lora")}
    assert alone["full"]["memory_layout"].startswith("one process")
    monkeypatch.setenv("WORLD_SIZE", "4")  # as torchrun --nproc_per_node 4 sets it (plan.world() reads it)
    ddp = plan("full", distributed="ddp")
    assert ddp["estimated_memory_gib"] == alone["full"]["estimated_memory_gib"]
    assert "4 processes (DDP)" in ddp["memory_layout"] and ddp["global_batch"] == 4 * alone["full"]["global_batch"]
    with pytest.raises(recipe.TrainError, match="CUDA GPUs only"):  # FSDP on these CPU processes is refused
        plan("full", distributed="fsdp")
    monkeypatch.setattr(recipe, "check_distributed", lambda options, device: None)  # as on 4 GPUs
    for method in ("full", "lora"):
        fsdp = plan(method, distributed="fsdp")
        assert "sharded over 4 processes (FSDP)" in fsdp["memory_layout"]
        one, four = alone[method]["estimated_memory_gib"], fsdp["estimated_memory_gib"]
        for part in ("weights", "trainable_grads_adamw"):  # a quarter each (to the plan's rounding)
            assert abs(four[part] - one[part] / 4) <= 0.01, (part, one, four)
        assert four["activations"] == one["activations"] and 0 < four["gathered"] < 1
        saved = 0.75 * (one["weights"] + one["trainable_grads_adamw"]) + one.get("autocast_copies", 0)
        assert abs(four["total"] - (one["total"] - saved + four["gathered"])) <= 0.02, (one, four)
    assert alone["full"]["estimated_memory_gib"]["trainable_grads_adamw"] > 3  # 16 bytes × 270M


def test_full_under_fsdp_keeps_fp32_master_weights_and_computes_in_the_training_dtype():
    """The engine settings a `--method full --distributed fsdp` run gets (FSDP itself needs CUDA processes)."""
    from types import SimpleNamespace

    from torch.distributed.fsdp import MixedPrecisionPolicy

    from elmtune.training.recipe import distributed_arguments, fsdp_mixed_precision

    fsdp = distributed_arguments(TrainOptions(method="full", distributed="fsdp"))
    assert fsdp["fsdp"] is True and fsdp["fsdp_config"]["version"] == 2
    assert fsdp["fsdp_config"]["transformer_layer_cls_to_wrap"] == ["OpenELMDecoderLayer"]
    plugin = SimpleNamespace(mixed_precision_policy=None)
    trainer = SimpleNamespace(accelerator=SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin)))
    fsdp_mixed_precision(trainer, torch.bfloat16)
    policy = plugin.mixed_precision_policy
    assert isinstance(policy, MixedPrecisionPolicy)
    assert policy.param_dtype == torch.bfloat16 and policy.reduce_dtype == torch.float32
    plugin.mixed_precision_policy = None
    fsdp_mixed_precision(trainer, torch.float32)
    assert plugin.mixed_precision_policy is None  # fp32: nothing to cast


def test_elmtune_eval_on_a_full_output_scores_the_model_alone(full_output, inputs, tmp_path, capsys):
    """`elmtune eval --model DIR` (no adapter): one column, the greedy answers stock transformers gives to the
    prompts training rendered, and the answer loss computed from stock logits."""
    from elmtune.cli import main
    from elmtune.tokenizer import load_tokenizer

    records = [json.loads(line) for line in inputs[1].read_text().splitlines()][-4:]  # held out: never trained on
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert main(["eval", "--model", str(full_output), "--data", str(heldout), "-o", str(tmp_path / "eval"),
                 "--max-new-tokens", "6", "--device", "cpu", "--dtype", "float32"]) == 0
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert report["n"] == 4 and report["adapter"] is None
    assert "model" in report and "base" not in report and "adapter_model" not in report
    assert "| metric | model |" in (tmp_path / "eval" / "eval.md").read_text()

    tok = load_tokenizer(str(full_output))
    stock = stock_model(full_output)
    total = count = 0
    for record, sample in zip(records, report["model"]["samples"]):
        prompt = [tok.bos_id] + tok.encode([record["instruction"] + record["input"] + "<sep>"])[0]  # openelm-sep
        assert sample["prompt"] == record["instruction"] + record["input"] + "<sep>"  # rendered as in training
        assert sample["prediction"] == tok.decode(stock_greedy(full_output, prompt, 6)).strip()
        answer = tok.encode([record["output"]])[0] + [tok.eos_id]
        with torch.no_grad():
            logits = stock(torch.tensor([prompt + answer])).logits[0, len(prompt) - 1:-1]
        total += torch.nn.functional.cross_entropy(logits, torch.tensor(answer), reduction="sum").item()
        count += len(answer)
    assert report["model"]["loss"] == pytest.approx(total / count, rel=1e-5)

    capsys.readouterr()
    assert main(["eval", "--data", str(heldout)]) == 2  # neither a model nor an adapter
    assert "give --adapter" in capsys.readouterr().err
