"""LoRA through PEFT behaves on our OpenELM exactly as it does on Apple's remote code under the tutorial."""

from __future__ import annotations

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open

from tests.helpers import tiny_model

TARGETS = ["token_embeddings", "qkv_proj", "out_proj", "proj_1", "proj_2"]


def randomise_lora(model) -> None:
    """PEFT starts LoRA B at zero (a no-op adapter); give every LoRA matrix values so the adapter matters."""
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.2)


@torch.no_grad()
def test_adapted_embedding_feeds_the_input_but_the_tied_head_keeps_the_base_weight():
    base = tiny_model()
    base_embedding = base.transformer.token_embeddings.weight.detach().clone()
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["token_embeddings"]))
    randomise_lora(model)
    model.eval()
    ids = torch.tensor([[1, 5, 9, 17, 33, 40]])
    adapted = model.base_model.model.transformer.token_embeddings(ids)
    assert not torch.allclose(adapted, base_embedding[ids])  # the adapter changes the inputs ...
    with model.disable_adapter():
        hidden = model.base_model.model.transformer(inputs_embeds=adapted).last_hidden_state
    expected = hidden @ base_embedding.T  # ... and the head is F.linear(h, base embedding), as in Apple's code
    assert (model(ids).logits - expected).abs().max() <= 1e-5
    # Folding the delta into the shared weight would change the head as well: a different model.
    merged = model.merge_and_unload()
    assert (merged(ids).logits - expected).abs().max() > 1e-2


@torch.no_grad()
def test_tutorial_adapter_saves_under_apples_module_names_and_reloads(tmp_path):
    model = get_peft_model(tiny_model(), LoraConfig(r=8, lora_alpha=8, lora_dropout=0.1, target_modules=TARGETS))
    randomise_lora(model)
    model.eval()
    ids = torch.tensor([[1, 5, 9, 17, 33, 40]])
    expected = model(ids).logits
    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "adapter_model.safetensors", "pt") as f:
        keys = set(f.keys())
    # The names the tutorial's adapters carry (PEFT on Apple's remote code): same module paths as ours.
    assert "base_model.model.transformer.token_embeddings.lora_embedding_A" in keys
    assert "base_model.model.transformer.layers.0.attn.qkv_proj.lora_A.weight" in keys
    assert "base_model.model.transformer.layers.1.ffn.proj_2.lora_B.weight" in keys
    assert len(keys) == 2 + 2 * 4 * 2  # embedding A/B + (qkv, out, proj_1, proj_2) × A/B × 2 layers
    reloaded = PeftModel.from_pretrained(tiny_model(), tmp_path).eval()
    assert torch.equal(reloaded(ids).logits, expected)
