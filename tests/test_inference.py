"""Inference: the training template follows the adapter, batches equal single prompts, stops are honoured."""

from __future__ import annotations

import pytest
import torch

from elmtune.inference import SamplingOptions, complete, generation_args, load_pipeline
from tests.helpers import train_tiny_adapter, word_tokenizer


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    return train_tiny_adapter(tmp_path_factory.mktemp("inference"), template="Q: {instruction} {input} A:")


def test_template_round_trip_from_training_metadata(adapter):
    base, adapter_dir = adapter
    pipeline = load_pipeline(adapter=str(adapter_dir))  # base model and template both come from elmtune.json
    assert pipeline.template.name == "custom" and pipeline.template.format == "Q: {instruction} {input} A:"
    assert pipeline.render("say", "a b") == "Q: say a b A:"
    [result] = complete(pipeline, [pipeline.render("say", "a b")], SamplingOptions(max_new_tokens=3))
    assert result.prompt == "Q: say a b A:"
    override = load_pipeline(model=str(base), adapter=str(adapter_dir), template="openelm-sep")
    assert override.render("say", "a b") == "saya b<sep>"


@pytest.mark.parametrize("penalty", [1.0, 1.2])
def test_batched_greedy_equals_one_at_a_time(adapter, penalty):
    _, adapter_dir = adapter
    # fp32: in 16-bit, a batch's padded matmuls may round differently from a lone prompt's (in any framework)
    pipeline = load_pipeline(adapter=str(adapter_dir), dtype="fp32")
    prompts = [pipeline.render("say", x) for x in ("a", "b c d e f g h", "x y", "hello hi say a b c")]
    sampling = SamplingOptions(max_new_tokens=12, repetition_penalty=penalty)
    batched = complete(pipeline, prompts, sampling, batch_size=4)
    alone = [complete(pipeline, [p], sampling, batch_size=1)[0] for p in prompts]
    assert [b.to_dict() for b in batched] == [a.to_dict() for a in alone]


def test_repetition_penalty_ignores_left_padding():
    tok = word_tokenizer()
    _, processors = generation_args(SamplingOptions(repetition_penalty=2.0), tok, torch.tensor([2, 0]))
    scores = torch.tensor([[1.0, 2.0, -1.0, 3.0], [1.0, 2.0, -1.0, 3.0]])
    ids = torch.tensor([[0, 0, 2, 3], [1, 1, 2, 3]])  # row 0 has two pads (token 0) in front
    out = processors(ids, scores.clone())
    assert out[0].tolist() == [1.0, 2.0, -2.0, 1.5]  # pad token 0 untouched
    assert out[1].tolist() == [1.0, 1.0, -2.0, 1.5]


def test_finish_reasons_eos_length_and_stop_strings(adapter):
    base, adapter_dir = adapter
    tuned = load_pipeline(adapter=str(adapter_dir))
    prompt = tuned.render("say", "a b")
    # the adapter learned to answer with one word and eos: generation stops there, eos not in the text
    eos = complete(tuned, [prompt], SamplingOptions(max_new_tokens=40, repetition_penalty=1.0))[0]
    assert eos.finish_reason == "stop" and eos.completion_tokens < 40 and "</s>" not in eos.output
    # a random model whose eos logit is always 0 (below the best of 95 random logits) runs to the limit ...
    raw = load_pipeline(model=str(base), template="openelm-sep")
    with torch.no_grad():
        raw.model.transformer.token_embeddings.weight[raw.tokenizer.eos_id] = 0.0
    long = complete(raw, [prompt], SamplingOptions(max_new_tokens=30, repetition_penalty=1.0))[0]
    assert long.finish_reason == "length" and long.completion_tokens == 30
    # ... unless a stop string appears: the output is cut just before it
    stop = long.output[len(long.output) // 2:][:3]
    stopped = complete(raw, [prompt], SamplingOptions(max_new_tokens=30, repetition_penalty=1.0, stop=[stop]))[0]
    assert stopped.finish_reason == "stop" and stopped.output == long.output[: long.output.index(stop)]


def test_sampling_is_seedable(adapter):
    _, adapter_dir = adapter
    pipeline = load_pipeline(adapter=str(adapter_dir))
    prompts = [pipeline.render("say", "a")] * 3
    sampling = SamplingOptions(max_new_tokens=8, temperature=1.5, top_k=20, seed=11)
    first = [r.output for r in complete(pipeline, prompts, sampling)]
    assert first == [r.output for r in complete(pipeline, prompts, sampling)]


def test_prompt_fields_come_from_the_flag_then_the_adapter_then_en():
    from elmtune.data import Fields
    from elmtune.inference import prompt_fields

    recorded = {"fields": {"instruction": "q", "input": None, "output": "a"}}
    assert prompt_fields(recorded) == Fields("q", None, "a")
    assert prompt_fields(recorded, "zh") == Fields.parse("zh")
    assert prompt_fields({}) == Fields.parse("en") == Fields("en_instruction", "en_input", "en_output")
    with pytest.raises(ValueError, match="unreadable fields"):
        prompt_fields({"fields": {"instruction": "q"}})
