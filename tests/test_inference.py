"""Inference: the training templates follow the adapter (prompt template for instructions, chat template for
conversations, old adapters as before, overrides), batches equal single prompts, stops are honoured."""

from __future__ import annotations

import pytest
import torch

from elmtune.data import DataError, Template
from elmtune.inference import Prompter, SamplingOptions, complete, generation_args, load_pipeline, read_metadata
from elmtune.tokenizer import load_tokenizer
from tests.helpers import WORD_CHAT_TEMPLATE, train_chat_adapter, train_tiny_adapter, word_tokenizer

SYSTEM, USER = {"role": "system", "content": "answer a"}, {"role": "user", "content": "say"}


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
    # the prompt fed to the model: bos + the template's text in one piece, as training encoded it
    tok = pipeline.tokenizer
    assert pipeline.prompt("say", "a b").input_ids == [tok.bos_id] + tok.encode(["Q: say a b A:"])[0]
    # a one-turn chat is that instruction (system text first); a longer conversation takes the chat template
    assert pipeline.chat_prompt([SYSTEM, USER]).text == "Q: answer a\nsay  A:"
    assert pipeline.chat_prompt([USER, {"role": "assistant", "content": "a"}, USER]).text == "<s>say<sep>a</s>say<sep>"


def ids(tok, text: str) -> list[int]:
    return tok.encode([text])[0]


def test_adapters_from_before_chat_templates_render_as_before(tmp_path):
    """An alpaca adapter's elmtune.json with and without the keys chat templates added: instructions, one-turn
    chats and conversations give the ids the tutorial's path and the old turn-by-turn rendering gave."""
    _, adapter_dir = train_tiny_adapter(tmp_path)
    tok = load_tokenizer(str(adapter_dir))
    saved = read_metadata(adapter_dir)
    old = {k: v for k, v in saved.items() if k not in ("format", "formats", "chat_template", "train_on")}
    assert saved["formats"] == {"alpaca": 32} and saved["chat_template"]["name"] == "openelm"
    bos, eos = [tok.bos_id], tok.eos_id
    for metadata in (saved, old):
        prompter = Prompter.for_adapter(metadata, tok)
        assert not prompter.instructions_as_chat and prompter.chat_template.name == "openelm"
        assert prompter.instruction("say", "a b").input_ids == bos + ids(tok, "saya b<sep>")
        assert prompter.conversation([SYSTEM, USER]).input_ids == bos + ids(tok, "answer a\nsay<sep>")
        assert prompter.conversation([USER, {"role": "assistant", "content": "a"}, USER]).input_ids == (
            bos + ids(tok, "say<sep>") + ids(tok, "a") + [eos] + ids(tok, "say<sep>"))
        assert prompter.conversation([USER, {"role": "assistant", "content": "a b"}]).input_ids == (
            bos + ids(tok, "say<sep>") + ids(tok, "a b"))  # a final assistant message is continued


def test_conversation_adapters_prompt_instructions_with_their_chat_template(tmp_path):
    _, plain = train_chat_adapter(tmp_path / "openelm")
    _, custom = train_chat_adapter(tmp_path / "custom", chat_template=WORD_CHAT_TEMPLATE)
    tok = load_tokenizer(str(plain))
    openelm = Prompter.for_adapter(read_metadata(plain), tok)
    assert openelm.instructions_as_chat and openelm.chat_template.name == "openelm"
    # under openelm a one-turn conversation is the tutorial's openelm-sep prompt, id for id
    assert openelm.instruction("say", " a").input_ids == [tok.bos_id] + ids(tok, "say a<sep>")
    saved = read_metadata(custom)
    prompter = Prompter.for_adapter(saved, tok)
    assert prompter.instruction("say", " a").text == "<s>hi say a hello "
    assert prompter.conversation([SYSTEM, USER]).text == "<s>z answer a hi say hello "
    assert prompter.conversation([USER, {"role": "assistant", "content": "a b"}]).text == "<s>hi say hello a b"
    # --template: instructions back on the prompt template; --chat-template: another chat template
    back = Prompter.for_adapter(saved, tok, template="openelm-sep")
    assert back.instruction("say").text == "say<sep>" and back.conversation([USER, USER]).text == "<s>hi say hi say hello "
    chatml = Prompter.for_adapter(saved, tok, chat_template="chatml")
    assert chatml.instruction("say").text == "<|im_start|>user\nsay<|im_end|>\n<|im_start|>assistant\n"
    with pytest.raises(DataError, match="prompt: the instruction is empty"):
        prompter.instruction(" ")


def test_a_model_with_its_own_elmtune_json_renders_with_its_templates(tmp_path):
    """A merged or fully fine-tuned model carries elmtune.json itself: used without an adapter, it renders as
    its training did; a base model without one, as before."""
    import json

    from tests.helpers import save_tiny_base

    model_dir = save_tiny_base(tmp_path / "model")
    assert load_pipeline(model=str(model_dir)).prompt("say").text == "say<sep>"
    (model_dir / "elmtune.json").write_text(json.dumps({
        "base_model": "elsewhere", "template": {"name": "openelm-sep", "format": "{instruction}{input}<sep>"},
        "formats": {"messages": 3}, "chat_template": {"name": "custom", "source": WORD_CHAT_TEMPLATE}}))
    pipeline = load_pipeline(model=str(model_dir))
    assert pipeline.prompt("say").text == "<s>hi say hello " and pipeline.chat_prompt([SYSTEM, USER]).text == (
        "<s>z answer a hi say hello ")


def test_chat_template_override_applies_to_instructions_of_alpaca_adapters(adapter):
    base, adapter_dir = adapter
    pipeline = load_pipeline(adapter=str(adapter_dir), chat_template="chatml")
    assert pipeline.prompter.instructions_as_chat and pipeline.template == Template.parse("Q: {instruction} {input} A:")
    assert pipeline.prompt("say").text == "<|im_start|>user\nsay<|im_end|>\n<|im_start|>assistant\n"
    both = load_pipeline(adapter=str(adapter_dir), chat_template="chatml", template="openelm-sep")
    assert both.prompt("say").text == "say<sep>" and both.chat_prompt([USER, USER]).text.startswith("<|im_start|>")
    with pytest.raises(ValueError, match="--chat-template 'nope': not a template name"):
        load_pipeline(adapter=str(adapter_dir), chat_template="nope")


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


def test_complete_decodes_with_the_preallocated_cache_as_with_a_dynamic_one(adapter, monkeypatch):
    """``complete`` hands generate a preallocated cache (in-place writes); its answers are those of a dynamic cache."""
    import elmtune.inference as inference
    from elmtune.models.decode import PreallocatedCache

    _, adapter_dir = adapter
    pipeline = load_pipeline(adapter=str(adapter_dir), dtype="fp32")
    prompts = [pipeline.render("say", x) for x in ("a", "b c d e f g h", "x y")]
    sampling = SamplingOptions(max_new_tokens=10)
    made = []
    fast = inference.decode_cache
    monkeypatch.setattr(inference, "decode_cache", lambda model, tokens: made.append(fast(model, tokens)) or made[-1])
    preallocated = complete(pipeline, prompts, sampling, batch_size=3)
    assert len(made) == 1 and isinstance(made[0], PreallocatedCache) and made[0].get_seq_length() > 0
    monkeypatch.setattr(inference, "decode_cache", lambda model, tokens: None)  # generate's own dynamic cache
    assert [c.to_dict() for c in preallocated] == [c.to_dict() for c in complete(pipeline, prompts, sampling, 3)]


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
