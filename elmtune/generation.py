"""Batched text generation: prompts rendered with the training template, left-padded, greedy or sampled."""

from __future__ import annotations

import torch
from transformers import GenerationConfig

from .tokenizer import Tokenizer


@torch.no_grad()
def generate_batch(model, tokenizer: Tokenizer, prompts: list[str], max_new_tokens: int = 64,
                   batch_size: int = 32, **sampling) -> list[str]:
    """Complete each prompt (already rendered with its template); returns the generated text only.

    Prompts are encoded exactly as in training (bos + prompt tokens) and left-padded, so a batch gives the same
    greedy output as each prompt alone.  Generation stops at eos.
    """
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=bool(sampling.get("temperature")),
                              eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id, **sampling)
    device = next(model.parameters()).device
    head = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    encoded = [head + ids for ids in tokenizer.encode(prompts)]
    outputs: list[str] = []
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start:start + batch_size]
        width = max(map(len, chunk))
        ids = torch.tensor([[tokenizer.pad_id] * (width - len(c)) + c for c in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in chunk], device=device)
        generated = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        for row in generated[:, width:].tolist():
            if tokenizer.eos_id in row:
                row = row[: row.index(tokenizer.eos_id)]
            outputs.append(tokenizer.decode(row))
    return outputs
