"""Activation checkpointing modes: same gradients as no checkpointing, and each mode recomputes what it says."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch.utils._python_dispatch import TorchDispatchMode

from elmtune.training.checkpointing import KEPT_PROJECTIONS, checkpointing_mode, enable_checkpointing
from elmtune.training.dropout import use_fast_dropout
from elmtune.training.fused_lora import use_fused_lora
from tests.helpers import tiny_model

TARGETS = ["token_embeddings", "qkv_proj", "out_proj", "proj_1", "proj_2"]


def lora_model(mode: str):
    """The tutorial's LoRA targets on a tiny model, with dropout (so recomputation must replay the same masks)."""
    model = tiny_model()
    torch.manual_seed(1)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.2, target_modules=TARGETS))
    use_fast_dropout(peft_model)
    use_fused_lora(peft_model)  # as elmtune trains: the recomputation must replay the fused forward too
    with torch.no_grad():  # B (and embedding A) start at zero: make every adapter matter so all gradients count
        for name, p in peft_model.named_parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.1)
    enable_checkpointing(peft_model, mode)
    return peft_model.train()


def packed_batch():
    """Two documents in one packed row (position ids restart), as elmtune's trainer feeds the model."""
    ids = torch.randint(3, 96, (1, 20), generator=torch.Generator().manual_seed(4))
    positions = torch.cat([torch.arange(12), torch.arange(8)])[None]
    labels = ids.clone()
    labels[:, :5] = -100
    return dict(input_ids=ids, position_ids=positions, labels=labels)


class MatmulCounter(TorchDispatchMode):
    """Counts the matmuls that use each frozen projection's weight (forward, recomputation and backward)."""

    def __init__(self, weights: dict[str, torch.Tensor]):
        super().__init__()
        self.addresses = {w.data_ptr(): name for name, w in weights.items()}
        self.counts = dict.fromkeys(weights, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
            for tensor in args:
                name = self.addresses.get(tensor.data_ptr()) if torch.is_tensor(tensor) else None
                if name is not None:
                    self.counts[name] += 1
        return func(*args, **(kwargs or {}))


def run(mode: str):
    model = lora_model(mode)
    assert checkpointing_mode(model) == mode
    layer = model.get_base_model().transformer.layers[0]
    weights = {"qkv_proj": layer.attn.qkv_proj.base_layer.weight, "out_proj": layer.attn.out_proj.base_layer.weight,
               "proj_1": layer.ffn.proj_1.base_layer.weight, "proj_2": layer.ffn.proj_2.base_layer.weight}
    torch.manual_seed(7)  # the dropout masks
    counter = MatmulCounter(weights)
    with counter:
        loss = model(**packed_batch()).loss
        loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, counter.counts


def test_every_mode_gives_the_gradients_of_no_checkpointing():
    loss_off, grads_off, _ = run("off")
    assert len(grads_off) > 10 and all(g.abs().sum() > 0 for g in grads_off.values())
    for mode in ("on", "full"):
        loss, grads, _ = run(mode)
        assert torch.equal(loss, loss_off)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, grads_off[name], rtol=1e-5, atol=1e-6, msg=f"{mode}: {name}")


def test_each_mode_recomputes_what_it_says():
    """Forward + backward of one layer: a frozen projection's weight is used twice (output, input gradient) when its
    output is kept, three times when the forward is run again in backward."""
    assert run("off")[2] == {"qkv_proj": 2, "out_proj": 2, "proj_1": 2, "proj_2": 2}
    assert run("full")[2] == {"qkv_proj": 3, "out_proj": 3, "proj_1": 3, "proj_2": 3}
    kept = {name.split(".")[-1] for name in KEPT_PROJECTIONS}
    assert run("on")[2] == {name: 2 if name in kept else 3 for name in ("qkv_proj", "out_proj", "proj_1", "proj_2")}


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="off, on, full"):
        enable_checkpointing(tiny_model(), "sometimes")


def test_auto_takes_the_first_mode_that_fits(monkeypatch):
    """off needs the most memory, full the least; auto picks off, then selective, then full as memory shrinks."""
    from elmtune.models.configuration_openelm import OpenELMConfig
    from elmtune.training import TrainOptions, plan

    config = OpenELMConfig.from_preset("openelm-270m")
    params, trainable, longest = 270_000_000, 10_000_000, 384
    needs = {mode: plan.estimate_memory(config, params, trainable, 8 * longest, "bf16", mode)["total"]
             for mode in ("off", "on", "full")}
    assert needs["off"] > needs["on"] > needs["full"]
    options = TrainOptions(gradient_checkpointing="auto", batch_size=8)
    for have, expected in ((needs["off"] / 0.6, "off"), (needs["on"] / 0.6, "on"), (needs["full"], "full")):
        monkeypatch.setattr(plan, "available_memory", lambda device=None, have=have: int(have))
        assert plan.decide_checkpointing(options, config, params, trainable, longest, "bf16")[0] == expected
    assert plan.decide_checkpointing(TrainOptions(gradient_checkpointing="on"), config, params, trainable, longest,
                                     "bf16") == ("on", "as asked")


def test_selective_falls_back_to_full_where_it_would_keep_nothing(monkeypatch):
    """A 4-bit base multiplies by dequantized copies of its weights, which the policy cannot recognise."""
    from elmtune.models.configuration_openelm import OpenELMConfig
    from elmtune.training import TrainOptions, plan

    config = OpenELMConfig.from_preset("openelm-270m")
    mode, why = plan.decide_checkpointing(TrainOptions(gradient_checkpointing="on", quantize="4bit"), config,
                                          270_000_000, 10_000_000, 384, "bf16")
    assert mode == "full" and "quantized" in why
    need_on = plan.estimate_memory(config, 270_000_000, 10_000_000, 8 * 384, "bf16", "on")["total"]
    monkeypatch.setattr(plan, "available_memory", lambda device=None: int(need_on / 0.6))  # selective would fit, off would not
    assert plan.decide_checkpointing(TrainOptions(gradient_checkpointing="auto", batch_size=8), config,
                                     270_000_000, 10_000_000, 384, "bf16")[0] == "on"
    assert plan.decide_checkpointing(TrainOptions(gradient_checkpointing="auto", batch_size=8, quantize="4bit"),
                                     config, 270_000_000, 10_000_000, 384, "bf16")[0] == "full"


def test_selective_is_kept_only_where_it_measures_faster_than_full():
    from elmtune.training.checkpointing import fastest_mode

    assert fastest_mode({"on": 1.0, "full": 1.2}, ("on", "full")) == "on"
    assert fastest_mode({"on": 1.2, "full": 1.0}, ("on", "full")) == "full"  # selective slower: full instead
    assert fastest_mode({"on": 1.0, "full": 1.0}, ("on", "full")) == "full"  # a tie: full, which keeps less
    # keeping everything wins unless recomputing measures clearly (MARGIN) faster
    assert fastest_mode({"off": 1.0, "on": 0.98, "full": 1.3}, ("off", "on", "full")) == "off"
    assert fastest_mode({"off": 1.0, "on": 1.3, "full": 0.9}, ("off", "on", "full")) == "full"


def test_the_probe_measures_each_mode_on_a_copy_of_a_layer():
    from elmtune.training.checkpointing import measure_modes, probe_layer

    model = lora_model("on")
    layer = probe_layer(model)
    real = model.get_base_model().transformer.layers[len(model.get_base_model().transformer.layers) // 2]
    assert layer is not real and type(layer) is type(real)
    times = measure_modes(layer, [7, 5], torch.float32, torch.device("cpu"), model.get_base_model().config)
    assert set(times) == {"off", "on", "full"} and all(t > 0 for t in times.values())
    assert all(p.grad is None for p in model.parameters())  # the model being trained is not touched
    assert checkpointing_mode(model) == "on"


@pytest.mark.parametrize("faster, expected", [("on", "on"), ("full", "full")])
def test_on_falls_back_to_full_where_full_measured_faster(monkeypatch, faster, expected):
    """``--gradient-checkpointing on`` runs selective only where it beat full in this machine's measurement."""
    from elmtune.training import checkpointing

    times = {"on": 1.0, "full": 2.0} if faster == "on" else {"on": 2.0, "full": 1.0}
    monkeypatch.setattr(checkpointing, "measured_modes", lambda *a, **k: times)
    model = lora_model("on")
    mode, why = checkpointing.settle_selective(model, 16, torch.float32, torch.device("cpu"))
    assert mode == expected == checkpointing_mode(model)
    assert "selective 1" in why or "selective 2" in why
    monkeypatch.setattr(checkpointing, "measured_modes", lambda *a, **k: None)  # probing off: selective as asked
    model = lora_model("on")
    assert checkpointing.settle_selective(model, 16, torch.float32, torch.device("cpu"))[0] == "on"


def test_the_measurement_is_cached_per_machine(tmp_path, monkeypatch):
    from elmtune.training import checkpointing

    monkeypatch.setenv("ELMTUNE_CACHE_DIR", str(tmp_path))
    model = lora_model("on")
    first = checkpointing.measured_modes(model, 6, torch.float32, torch.device("cpu"))
    assert set(first) == {"on", "full"} and all(t > 0 for t in first.values())
    monkeypatch.setattr(checkpointing, "measure_modes", lambda *a, **k: pytest.fail("measured again"))
    assert checkpointing.measured_modes(model, 6, torch.float32, torch.device("cpu")) == first
    assert len(list((tmp_path / "probes").glob("checkpointing-modes-*.json"))) == 1
