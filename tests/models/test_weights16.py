"""16-bit weights with fp32 arithmetic on a CPU (elmtune.models.weights16): the kernel and the prepared model
against the reference — fp32 arithmetic on the same 16-bit-rounded weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from elmtune.models import weights16
from elmtune.models.decode import PreallocatedCache
from tests.helpers import tiny_model

DTYPES = [torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 9, weights16.KERNEL_ROWS, weights16.KERNEL_ROWS + 1])
@pytest.mark.parametrize("out_features", [1, 7, 64, 130])
def test_linear_equals_fp32_on_the_rounded_weights(cpu_kernel, dtype, rows, out_features):
    generator = torch.Generator().manual_seed(rows * 1000 + out_features)
    x = torch.randn(rows, 40, generator=generator)
    weight = torch.randn(out_features, 40, generator=generator).to(dtype)
    out = weights16.linear(x, weight)
    assert out.dtype == torch.float32 and out.shape == (rows, out_features)
    torch.testing.assert_close(out, F.linear(x, weight.float()), rtol=1e-5, atol=1e-5)


def test_linear_keeps_leading_dimensions_and_falls_back_where_the_kernel_cannot(cpu_kernel):
    x = torch.randn(2, 3, 24)
    weight = torch.randn(10, 24).half()
    torch.testing.assert_close(weights16.linear(x, weight), F.linear(x, weight.float()), rtol=1e-5, atol=1e-5)
    odd, weight = torch.randn(3, 21), torch.randn(5, 21).bfloat16()  # a width the kernel does not take (not a
    # multiple of 8): F.linear on an fp32 copy of the weight
    torch.testing.assert_close(weights16.linear(odd, weight), F.linear(odd, weight.float()), rtol=1e-5, atol=1e-5)


def test_linear_is_differentiable_through_the_fallback(cpu_kernel):
    x = torch.randn(2, 16, requires_grad=True)
    weight = torch.randn(4, 16).half()
    weights16.linear(x, weight).sum().backward()
    torch.testing.assert_close(x.grad, weight.float().sum(0).expand(2, 16))


def _reference(dtype: torch.dtype):
    """The tiny model with its weights rounded to ``dtype``, computing in fp32."""
    return tiny_model().to(dtype).float()


@pytest.mark.parametrize("dtype", DTYPES)
def test_prepared_model_decodes_like_fp32_arithmetic_on_its_weights(cpu_kernel, dtype):
    model = tiny_model().to(dtype)
    reference = _reference(dtype)
    keys = {k: (v.shape, v.dtype) for k, v in model.state_dict().items()}
    assert "fp32 arithmetic" in weights16.prepare(model)
    assert model.transformer.layers[0].attn.qkv_proj.weight.dtype == dtype  # weights stay 16-bit
    assert model.transformer.token_embeddings.weight.dtype == dtype  # the tied head too
    assert model.transformer.norm.weight.dtype == torch.float32
    assert set(model.state_dict()) == set(keys)  # the same checkpoint keys
    ids = torch.tensor([[1, 5, 9, 13, 40, 41], [1, 7, 3, 2, 60, 61]])
    with torch.no_grad():
        logits, expected = model(ids).logits, reference(ids).logits
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    for batch in (ids[:1], ids):  # batch 1 and 2: a 6-token prefill, then single-token steps, all through the kernel
        runs = [m.generate(batch, cache=PreallocatedCache(m.config, reserve=batch.shape[1] + 16), max_new_tokens=16,
                           min_new_tokens=16, do_sample=False, pad_token_id=0, eos_token_id=2, output_logits=True,
                           return_dict_in_generate=True) for m in (model, reference)]
        assert torch.equal(runs[0].sequences, runs[1].sequences)
        torch.testing.assert_close(torch.stack(runs[0].logits), torch.stack(runs[1].logits), rtol=1e-4, atol=1e-4)


def test_prepare_leaves_fp32_models_and_unusable_machines_alone(monkeypatch):
    model = tiny_model()
    assert weights16.prepare(model) == ""
    assert type(model.transformer.layers[0].attn.qkv_proj) is torch.nn.Linear
    half = tiny_model().half()
    monkeypatch.setattr(weights16, "kernel_available", lambda: (False, "no compiler"))
    assert weights16.prepare(half) == ""
    assert half.transformer.norm.weight.dtype == torch.float16  # untouched: PyTorch's own 16-bit path


def test_prepare_keeps_a_peft_adapter_working(cpu_kernel):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["qkv_proj", "out_proj", "proj_1", "proj_2",
                                                           "token_embeddings"], init_lora_weights=False)
    torch.manual_seed(1)
    model = get_peft_model(tiny_model(), config).half()
    reference = get_peft_model(tiny_model(), config)
    reference.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    for name, parameter in model.named_parameters():  # the adapter in fp32, as PeftModel.from_pretrained casts it
        if "lora_" in name:
            parameter.data = parameter.data.float()
    assert weights16.prepare(model)
    ids = torch.tensor([[1, 5, 9, 13, 40, 41]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference.eval()(ids).logits, rtol=1e-4, atol=1e-4)


def test_prepared_model_gives_the_reference_evaluation_loss(cpu_kernel):
    model, reference = tiny_model().half(), _reference(torch.float16)
    weights16.prepare(model)
    ids = torch.tensor([[1, 5, 9, 13, 40, 41, 7, 3]])
    labels = ids.clone()
    labels[:, :3] = -100
    with torch.no_grad():
        for m in (model, reference):
            m.supervised_logits_only = True
        torch.testing.assert_close(model(ids, labels=labels).loss, reference(ids, labels=labels).loss)


def test_load_pipeline_decodes_16_bit_weights_through_the_kernel_on_a_cpu(cpu_kernel, tmp_path):
    from elmtune.inference import load_pipeline
    from tests.helpers import save_tiny_base

    base = save_tiny_base(tmp_path / "base")
    pipeline = load_pipeline(model=str(base), dtype="fp16", device="cpu")
    assert isinstance(pipeline.model.transformer.layers[0].attn.qkv_proj, weights16.Linear16)
    kept = load_pipeline(model=str(base), dtype="fp16", device="cpu", decode_kernel=False)
    assert type(kept.model.transformer.layers[0].attn.qkv_proj) is torch.nn.Linear


def test_a_prepared_model_cast_to_fp32_still_computes_right(cpu_kernel):
    model = tiny_model().half()
    weights16.prepare(model)
    model.float()  # Linear16 keeps its class, now over fp32 weights: the kernel must not read them as 16-bit
    ids = torch.tensor([[1, 5, 9, 13]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, _reference(torch.float16)(ids).logits, rtol=1e-4, atol=1e-4)
