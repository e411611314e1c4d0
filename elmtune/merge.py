"""``elmtune merge``: base + LoRA adapter → one standalone checkpoint in Apple's layout.

The trap: Apple's OpenELM ties the output head to ``token_embeddings``, and under PEFT the head keeps using
the *base* embedding even when the embedding itself is adapted.  Folding the LoRA delta into the shared matrix
would therefore change the head too and ship a different model.  When the embedding was adapted, the merged
checkpoint unties the head: ``share_input_output_layers: false`` and ``lm_head.weight`` = the base embedding,
so merged logits equal base + adapter logits.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch import nn

from .inference import METADATA_FILE, load_pipeline
from .tokenizer import TOKENIZER_FILES

# transformers-internal keys that Apple's config.json does not have.
_NOT_APPLES = {"dtype", "output_attentions", "return_dict", "chunk_size_feed_forward", "is_encoder_decoder",
               "id2label", "label2id", "problem_type", "output_hidden_states", "pad_token_id", "_name_or_path"}


class MergeError(ValueError):
    pass


def embedding_adapted(peft_model) -> bool:
    embedding = peft_model.base_model.model.transformer.token_embeddings
    return bool(getattr(embedding, "lora_embedding_A", None)) and len(embedding.lora_embedding_A) > 0


def merge_adapter(peft_model):
    """Fold the adapter into the weights; untie the head when the embedding was adapted (see module doc)."""
    base = peft_model.base_model.model
    untie = base.lm_head is None and embedding_adapted(peft_model)
    base_embedding = base.transformer.token_embeddings.weight.detach().clone() if untie else None
    merged = peft_model.merge_and_unload()
    if untie:
        merged.lm_head = nn.Linear(merged.config.model_dim, merged.config.vocab_size, bias=False,
                                   dtype=base_embedding.dtype, device=base_embedding.device)
        merged.lm_head.weight = nn.Parameter(base_embedding)
        merged.config.share_input_output_layers = False
    return merged, untie


def apple_config(config) -> dict:
    """The config as Apple's ``config.json`` spells it (``torch_dtype``, no transformers-internal keys)."""
    data = config.to_dict()
    dtype = data.pop("dtype", None)
    data = {k: v for k, v in data.items() if k not in _NOT_APPLES}
    data["torch_dtype"] = str(dtype).removeprefix("torch.") if dtype is not None else "float32"
    data["architectures"] = ["OpenELMForCausalLM"]
    return dict(sorted(data.items()))


def save_apple_checkpoint(model, directory: Path, max_shard_size: str, state_dict: dict | None = None) -> None:
    """Safetensors (sharded above ``max_shard_size``, with ``model.safetensors.index.json``) + Apple's config;
    ``state_dict`` replaces the model's own (e.g. gathered from FSDP shards)."""
    model.save_pretrained(directory, max_shard_size=max_shard_size, state_dict=state_dict)
    (directory / "config.json").write_text(json.dumps(apple_config(model.config), indent=2) + "\n", encoding="utf-8")


def merge(adapter: str, output_dir: str, model: str | None = None, tokenizer: str | None = None,
          dtype: str = "float32", max_shard_size: str = "2GB", overwrite: bool = False, device: str = "auto") -> dict:
    """Write base + adapter as a standalone model directory; returns what was done.

    The adapter is folded in fp32 on ``device`` (default: the GPU when there is one), whatever ``dtype`` the
    checkpoint is then written in: a delta folded into 16-bit weights would be rounded twice."""
    out = Path(output_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise MergeError(f"--output-dir {out} is not empty; pass --overwrite to replace its model files")
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    pipeline = load_pipeline(model=model, adapter=adapter, tokenizer=tokenizer, dtype=torch.float32, device=device)
    merged, untied = merge_adapter(pipeline.model)
    tmp = out.with_name(out.name + ".tmp-merge")
    shutil.rmtree(tmp, ignore_errors=True)
    save_apple_checkpoint(merged.to(device="cpu", dtype=torch_dtype), tmp, max_shard_size)
    pipeline.tokenizer.save(tmp)
    if pipeline.metadata:
        (tmp / METADATA_FILE).write_text(json.dumps({**pipeline.metadata, "merged_from": str(adapter)}, indent=2))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)  # the finished directory appears at once, never half-written
    return {"output_dir": str(out), "untied_head": untied, "dtype": dtype,
            "files": sorted(p.name for p in out.iterdir() if p.name not in TOKENIZER_FILES)}
