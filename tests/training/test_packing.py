"""Speed-ups that must not change results: packing, supervised-only logits, micro-batch/accumulation splits."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from elmtune.data.collate import PackedCollator
from elmtune.models.openelm import supervised_loss
from elmtune.training import TrainOptions, train
from tests.helpers import tiny_model, tiny_run_inputs

EXAMPLES = [  # (input_ids, labels): prompt masked, answer + eos supervised
    ([1, 5, 9, 17, 33, 2], [-100, -100, -100, 17, 33, 2]),
    ([1, 7, 8, 2], [-100, -100, 8, 2]),
    ([1, 60, 61, 62, 63, 64, 65, 2], [-100, -100, -100, -100, 63, 64, 65, 2]),
]


def per_token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each supervised next-token prediction, in order."""
    targets = labels[1:]
    losses = F.cross_entropy(logits[:-1].float(), targets.clamp(min=0), reduction="none")
    return losses[targets != -100]


@torch.no_grad()
def test_packed_row_gives_the_same_per_token_losses_as_each_example_alone():
    model = tiny_model()
    batch = PackedCollator()([{"input_ids": i, "labels": l} for i, l in EXAMPLES])
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6, 7]]
    packed = per_token_losses(model(batch["input_ids"], position_ids=batch["position_ids"]).logits[0],
                              batch["labels"][0])
    alone = torch.cat([per_token_losses(model(torch.tensor([i])).logits[0], torch.tensor(l)) for i, l in EXAMPLES])
    assert packed.shape == alone.shape == (9,)
    assert (packed - alone).abs().max() <= 1e-5


def test_supervised_only_logits_give_the_same_loss_and_gradients_as_full_logits():
    ids = torch.randint(3, 96, (3, 20), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :8] = -100
    labels[1, 15:] = -100
    results = []
    for supervised_only in (False, True):
        model = tiny_model().train()
        model.supervised_logits_only = supervised_only
        out = model(ids, labels=labels)
        assert (out.logits is None) is supervised_only
        out.loss.backward()
        results.append((out.loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (full, full_grads), (fast, fast_grads) = results
    assert abs(full.item() - fast.item()) <= 1e-5
    assert all(torch.allclose(a, b, atol=1e-6, rtol=1e-5) for a, b in zip(full_grads, fast_grads))
    # chunking changes nothing either, and the loss is a mean over supervised tokens (or over num_items_in_batch)
    model = tiny_model()
    hidden = model.transformer(ids).last_hidden_state
    weight = model.output_weight()
    one = supervised_loss(hidden, weight, labels, chunk_size=5)
    assert abs(one.item() - full.item()) <= 1e-5
    with torch.no_grad():  # the evaluation path (no gradients computed) gives the same loss
        assert abs(supervised_loss(hidden, weight, labels, chunk_size=5).item() - full.item()) <= 1e-5
    n = int((labels[:, 1:] != -100).sum())
    assert abs(supervised_loss(hidden, weight, labels, num_items_in_batch=2 * n).item() - full.item() / 2) <= 1e-5


@pytest.fixture(scope="module")
def data_and_model(tmp_path_factory):
    directory = tmp_path_factory.mktemp("splits")
    tiny_run_inputs(directory, 16)
    return directory


@pytest.mark.parametrize("batch_size, grad_accum, packing", [(4, 2, False), (2, 4, True), (1, 8, False)])
def test_any_micro_batch_split_with_or_without_packing_trains_the_same(data_and_model, tmp_path, batch_size,
                                                                       grad_accum, packing):
    def run(out, bs, ga, pack):
        train(TrainOptions(model=str(data_and_model / "base"), data=[str(data_and_model / "data.jsonl")], fields="zh",
                           output_dir=str(out), batch_size=bs, grad_accum=ga, packing=pack, max_steps=2,
                           lr=5e-2, lora_dropout=0.0, lora_r=4, lora_alpha=8, precision="fp32", save_steps=100,
                           logging_steps=1, gradient_checkpointing="off"))
        losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
                  if '"loss"' in line]
        return load_file(out / "adapter_model.safetensors"), losses

    reference, reference_losses = run(tmp_path / "ref", 8, 1, True)  # one packed micro-batch of 8 per step
    adapter, losses = run(tmp_path / "split", batch_size, grad_accum, packing)
    # step 1's loss is the global-batch mean; step 2's shows the update was the same
    assert losses == pytest.approx(reference_losses, rel=1e-5)
    # Adam divides by sqrt(v): gradients that are ~0 up to summation-order noise get noise-sized steps, so the
    # weights agree to ~1e-4 here rather than 1e-6 (a normalisation bug would move them by ~lr = 5e-2)
    worst = max((adapter[k] - reference[k]).abs().max().item() for k in reference)
    assert worst <= 1e-3, worst
