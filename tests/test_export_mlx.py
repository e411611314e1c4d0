"""``elmtune export mlx``: what mlx-lm runs gives elmtune's prompts, logits and greedy tokens.

The tests that run mlx-lm are skipped where ``mlx`` / ``mlx-lm`` are not installed (``pip install
"elmtune[mlx]"``; on Linux the CPU wheels, ``mlx[cpu]``); the files, the LoRA arithmetic and the refusals are
checked without them.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from elmtune.cli import main
from elmtune.data.templates import ALPACA_NO_INPUT
from elmtune.export_mlx import ExportError, export_mlx
from elmtune.inference import SamplingOptions, complete, load_pipeline
from tests.helpers import WORD_CHAT_TEMPLATE, train_tiny_adapter

NO_EMBEDDING = ["qkv_proj", "out_proj", "proj_1", "proj_2"]
PROMPTS = ["say a b", "say hello x"]
STEPS = 16  # forced continuation length compared token by token


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(base, adapter) trained by `elmtune train` on the tiny model, without token_embeddings."""
    return train_tiny_adapter(tmp_path_factory.mktemp("mlx"), lora_targets=NO_EMBEDDING)


@pytest.fixture(scope="module")
def embedding_trained(tmp_path_factory):
    """(base, adapter) whose targets include token_embeddings (the tied-head case)."""
    return train_tiny_adapter(tmp_path_factory.mktemp("mlx-emb"), max_steps=2)


def mlx_lm():
    return pytest.importorskip("mlx_lm", reason="mlx-lm is not installed (pip install 'elmtune[mlx]'; on Linux "
                                                "'mlx[cpu]' mlx-lm)")


def compare_with_elmtune(pipeline, model, tokenizer, tol=1e-3):
    """For each prompt: mlx-lm's chat-template prompt ids = elmtune's; logits within ``tol`` over prompt and
    continuation; the same greedy tokens (elmtune's `complete`, repetition penalty 1.0, up to eos; and a forced
    ``STEPS``-token continuation).  Returns the largest logit difference."""
    import mlx.core as mx
    from mlx_lm import generate
    from mlx_lm.generate import generate_step
    from mlx_lm.sample_utils import make_sampler

    greedy = make_sampler(temp=0.0)
    worst = 0.0
    for text in PROMPTS:
        ours = pipeline.prompt(text).input_ids
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                 tokenize=False)
        theirs = tokenizer.encode(rendered, add_special_tokens=False)  # as mlx_lm.generate encodes it
        assert theirs == ours, text
        with torch.no_grad():
            forced = pipeline.model.generate(torch.tensor([ours]), max_new_tokens=STEPS, min_new_tokens=STEPS,
                                             do_sample=False, eos_token_id=None)[0].tolist()
            reference = pipeline.model(torch.tensor([forced])).logits[0].numpy()
        logits = np.array(model(mx.array([forced]))[0].astype(mx.float32))
        worst = max(worst, float(np.abs(logits - reference).max()))
        tokens = [int(t) for t, _ in generate_step(mx.array(ours), model, max_tokens=STEPS, sampler=greedy)]
        assert tokens == forced[len(ours):], text

        [done] = complete(pipeline, [pipeline.prompt(text)], SamplingOptions(max_new_tokens=STEPS,
                                                                             repetition_penalty=1.0))
        assert generate(model, tokenizer, ours, max_tokens=STEPS, sampler=greedy) == done.output, text
    assert worst < tol
    return worst


def test_adapter_only_runs_in_mlx_lm_as_elmtune_generate(trained, tmp_path):
    mlx_lm()
    from mlx_lm import load

    _, adapter = trained
    summary = export_mlx(str(adapter), str(tmp_path / "adapter"), adapter_only=True,
                         base_output=str(tmp_path / "base"))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["fine_tune_type"] == "lora" and config["num_layers"] == 2
    assert config["lora_parameters"] == {"rank": 4, "scale": 2.0, "dropout": 0.0,  # lora_alpha 8 / r 4
                                         "keys": ["attn.out_proj", "attn.qkv_proj", "ffn.proj_1", "ffn.proj_2"]}
    assert summary["tensors"] == 16
    pipeline = load_pipeline(adapter=str(adapter), dtype=torch.float32, device="cpu")
    base_only, tokenizer = load(str(tmp_path / "base"))
    model, tokenizer = load(str(tmp_path / "base"), adapter_path=str(tmp_path / "adapter"))
    # the adapter matters: without it mlx-lm's logits are far from base + adapter's
    import mlx.core as mx
    ids = pipeline.prompt(PROMPTS[0]).input_ids
    with torch.no_grad():
        adapted = pipeline.model(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(np.array(base_only(mx.array([ids]))[0]) - adapted).max() > 0.1
    compare_with_elmtune(pipeline, model, tokenizer)


def test_adapter_tensors_are_peft_deltas_transposed_without_mlx(trained, tmp_path):
    """scale · (lora_a @ lora_b)ᵀ, from the written files alone, is the delta PEFT folds into each weight."""
    from elmtune.models.loading import load_model

    base, adapter = trained
    export_mlx(str(adapter), str(tmp_path / "a"), adapter_only=True)
    tensors = load_file(str(tmp_path / "a" / "adapters.safetensors"))
    scale = json.loads((tmp_path / "a" / "adapter_config.json").read_text())["lora_parameters"]["scale"]
    merged = load_pipeline(adapter=str(adapter), dtype=torch.float32, device="cpu").model.merge_and_unload()
    original = load_model(str(base)).state_dict()
    for name, weight in merged.state_dict().items():
        module = name.removesuffix(".weight")
        if f"{module}.lora_a" in tensors:
            delta = scale * (tensors[f"{module}.lora_a"] @ tensors[f"{module}.lora_b"]).T
            torch.testing.assert_close(original[name] + delta, weight, rtol=0, atol=1e-6)
        else:
            assert torch.equal(original[name], weight), name
    assert (tmp_path / "a" / "chat_template.jinja").read_text().startswith("{%- if messages")


def test_fused_export_runs_in_mlx_lm_as_elmtune_generate(trained, tmp_path):
    mlx_lm()
    from mlx_lm import load

    _, adapter = trained
    summary = export_mlx(str(adapter), str(tmp_path / "fused"))
    assert summary["kind"] == "fused" and not summary["untied_head"]
    model, tokenizer = load(str(tmp_path / "fused"))
    compare_with_elmtune(load_pipeline(adapter=str(adapter), dtype=torch.float32, device="cpu"), model, tokenizer)


def test_adapted_embedding_refused_as_adapter_only_and_fused_with_an_untied_head(embedding_trained, tmp_path):
    mlx_lm()
    from mlx_lm import load

    _, adapter = embedding_trained
    with pytest.raises(ExportError, match="ties its output head"):
        export_mlx(str(adapter), str(tmp_path / "a"), adapter_only=True)
    assert not (tmp_path / "a").exists()
    summary = export_mlx(str(adapter), str(tmp_path / "fused"))
    assert summary["untied_head"]
    config = json.loads((tmp_path / "fused" / "config.json").read_text())
    assert config["share_input_output_layers"] is False
    assert "lm_head.weight" in load_file(str(tmp_path / "fused" / "model.safetensors"))
    model, tokenizer = load(str(tmp_path / "fused"))
    assert "lm_head" in model  # mlx-lm's openelm reads share_input_output_layers: false
    compare_with_elmtune(load_pipeline(adapter=str(adapter), dtype=torch.float32, device="cpu"), model, tokenizer)


@pytest.mark.slow  # ~15 s on 2 busy CPU cores: a training, a merge, three exports, two quantisations
def test_checkpoint_export_and_quantised_exports(embedding_trained, tmp_path):
    """An `elmtune merge` output (adapted token_embeddings → untied head) exported as it is, then 8- and 4-bit:
    teacher-forced greedy agreement on 3 × 16 tokens (measured with mlx 0.32.4 on the CPU: 8-bit 47/48, 4-bit
    26/48 — this tiny random model's close logits are what 4-bit noise flips; chance is 1/96)."""
    mlx_lm()
    import mlx.core as mx
    from mlx_lm import load

    from elmtune.merge import merge

    _, adapter = embedding_trained
    merge(str(adapter), str(tmp_path / "merged"))
    pipeline = load_pipeline(model=str(tmp_path / "merged"), dtype=torch.float32, device="cpu")
    export_mlx(str(tmp_path / "merged"), str(tmp_path / "mlx"))
    compare_with_elmtune(pipeline, *load(str(tmp_path / "mlx")))

    agreement = {}
    for bits in (8, 4):
        summary = export_mlx(str(tmp_path / "merged"), str(tmp_path / f"q{bits}"), q_bits=bits, q_group_size=32)
        assert summary["quantization"]["bits"] == bits
        config = json.loads((tmp_path / f"q{bits}" / "config.json").read_text())
        assert config["quantization"] == {"group_size": 32, "bits": bits, "mode": "affine"}
        model, _ = load(str(tmp_path / f"q{bits}"))
        same = 0
        for text in [*PROMPTS, "say z"]:
            ids = pipeline.prompt(text).input_ids
            with torch.no_grad():
                forced = pipeline.model.generate(torch.tensor([ids]), max_new_tokens=STEPS, min_new_tokens=STEPS,
                                                 do_sample=False, eos_token_id=None)[0].tolist()
            predicted = np.array(model(mx.array([forced[:-1]]))[0]).argmax(-1)[len(ids) - 1:]
            same += int((predicted == np.array(forced[len(ids):])).sum())
        agreement[bits] = same
    print(f"greedy agreement of 48 tokens: 8-bit {agreement[8]}, 4-bit {agreement[4]}")
    assert agreement[8] >= 44 and agreement[4] >= 20


def test_templates_travel_in_the_tokenizer_config(trained, tmp_path):
    """transformers' apply_chat_template over the exported tokenizer (what mlx-lm calls) renders a single
    instruction with the adapter's prompt template (here alpaca's no-input form), system texts joined with
    newlines as elmtune joins them; a longer conversation through the chat template."""
    from transformers import AutoTokenizer

    _, adapter = trained
    export_mlx(str(adapter), str(tmp_path / "m"), template="alpaca")
    hf = AutoTokenizer.from_pretrained(tmp_path / "m")
    pipeline = load_pipeline(adapter=str(adapter), template="alpaca", dtype=torch.float32, device="cpu")
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "say a"}]
    text = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == "<s>" + ALPACA_NO_INPUT.format(instruction="be brief\nsay a")
    assert text == "<s>" + pipeline.chat_prompt(messages).text  # elmtune's text leaves out the bos it feeds
    turns = [{"role": "user", "content": "say a"}, {"role": "assistant", "content": "a"},
             {"role": "user", "content": "say b"}]
    # a longer conversation: the openelm chat template, a space where elmtune starts a turn's tokens afresh
    assert hf.apply_chat_template(turns, add_generation_prompt=True, tokenize=False) == "<s>say a<sep> a</s>say b<sep>"
    assert json.loads((tmp_path / "m" / "tokenizer_config.json").read_text())["legacy"] is True

    # a chat template given at export (as for an adapter trained on conversations) renders instructions too,
    # as it stands (the same text; see the README for where whole-text tokenization differs)
    export_mlx(str(adapter), str(tmp_path / "chat"), chat_template=WORD_CHAT_TEMPLATE)
    hf = AutoTokenizer.from_pretrained(tmp_path / "chat")
    assert hf.chat_template == WORD_CHAT_TEMPLATE
    pipeline = load_pipeline(adapter=str(adapter), chat_template=WORD_CHAT_TEMPLATE, device="cpu")
    for conversation in (messages, turns):
        text = hf.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        assert text == pipeline.chat_prompt(conversation).text


def test_cli_errors_are_one_line_exit_2(embedding_trained, trained, tmp_path, capsys, monkeypatch):
    _, adapter = embedding_trained
    assert main(["export", "mlx", str(adapter), "-o", str(tmp_path / "a"), "--adapter-only"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("elmtune export mlx: error:") and "ties its output head" in err and "\n" not in err
    assert main(["export", "mlx", str(tmp_path), "-o", str(tmp_path / "b"), "--adapter-only"]) == 2
    assert "holds no adapter_config.json" in capsys.readouterr().err
    monkeypatch.setattr("elmtune.export_mlx.mlx_available", lambda: False)
    assert main(["export", "mlx", str(trained[1]), "-o", str(tmp_path / "c"), "--q-bits", "4"]) == 2
    assert "mlx-lm, which is not installed" in capsys.readouterr().err
    # without mlx the files are still written, and the commands to run them printed
    assert main(["export", "mlx", str(trained[1]), "-o", str(tmp_path / "d"), "--adapter-only"]) == 0
    out = capsys.readouterr().out
    assert f"--adapter-path {tmp_path / 'd'}" in out and "mlx is not installed here" in out
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["adapter_config.json", "adapters.safetensors",
                                                                  "chat_template.jinja"]
    assert main(["export", "mlx", str(trained[1]), "-o", str(tmp_path / "d"), "--adapter-only"]) == 2
    assert "is not empty; pass --overwrite" in capsys.readouterr().err
    assert main(["export", "mlx", str(trained[1]), "-o", str(trained[1].parent), "--adapter-only",
                 "--overwrite"]) == 2
    assert "would replace" in capsys.readouterr().err and (trained[1] / "adapter_config.json").is_file()
    base_files = sorted(p.name for p in trained[0].iterdir())  # nor the base model it reads, even with --overwrite
    assert main(["export", "mlx", str(trained[1]), "-o", str(tmp_path / "e"), "--adapter-only", "--model",
                 str(trained[0]), "--base-output", str(trained[0]), "--overwrite"]) == 2
    assert f"would replace {trained[0]}" in capsys.readouterr().err
    assert sorted(p.name for p in trained[0].iterdir()) == base_files


def test_llama2_tokenizer_encodes_the_rendered_prompt_as_elmtune(tmp_path):
    """With the real Llama-2 tokenizer, the text mlx-lm renders and encodes as a whole gives the ids elmtune
    feeds: single instructions (``<s>`` + SentencePiece) under alpaca and openelm-sep, Chinese included, and
    conversations with system messages and history under the openelm chat template, whether instructions use
    the prompt template or (an adapter trained on conversations) the chat template."""
    from transformers import AutoTokenizer

    from elmtune.export_mlx import mlx_chat_template, write_tokenizer
    from elmtune.inference import Prompter
    from elmtune.tokenizer import load_tokenizer
    from tests.helpers import shared_path

    tokenizer = load_tokenizer(str(shared_path("data", "llama2-tokenizer")))
    write_tokenizer(tokenizer, Prompter.for_adapter({}, tokenizer), tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)  # converting Llama-2's 32k pieces takes seconds: once
    assert hf.chat_template == mlx_chat_template(Prompter.for_adapter({}, tokenizer))
    conversations = [
        [{"role": "user", "content": "Name three colours."}],
        [{"role": "user", "content": "把这句话翻译成英文：你好"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour"}],
        [{"role": "system", "content": "z"}, {"role": "user", "content": "say a"},
         {"role": "assistant", "content": "a b"}, {"role": "user", "content": "你好 x"}],
        [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"},
         {"role": "user", "content": "again\nand"}]]
    for prompter in (Prompter.for_adapter({}, tokenizer, "alpaca"), Prompter.for_adapter({}, tokenizer),
                     Prompter.for_adapter({}, tokenizer, None, "openelm")):  # the last: instructions as chat
        for conversation in conversations:
            rendered = hf.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False,
                                              chat_template=mlx_chat_template(prompter))
            assert hf.encode(rendered, add_special_tokens=False) == prompter.conversation(conversation).input_ids


@pytest.mark.slow  # ~27 s on 2 busy CPU cores: a DoRA training, two exports, one quantisation
def test_dora_adapter_only_and_a_quantised_base(tmp_path):
    """A DoRA adapter as mlx-lm's ``fine_tune_type: dora`` (PEFT's magnitude vector as ``m``) runs as elmtune
    does; with ``--q-bits 8 --base-output`` mlx-lm runs it on the quantised base."""
    mlx_lm()
    import mlx.core as mx
    from mlx_lm import load

    _, adapter = train_tiny_adapter(tmp_path, method="dora", lora_targets=NO_EMBEDDING)
    summary = export_mlx(str(adapter), str(tmp_path / "a"), adapter_only=True, base_output=str(tmp_path / "b"))
    assert summary["adapter_config"]["fine_tune_type"] == "dora"
    assert "transformer.layers.0.attn.qkv_proj.m" in load_file(str(tmp_path / "a" / "adapters.safetensors"))
    pipeline = load_pipeline(adapter=str(adapter), dtype=torch.float32, device="cpu")
    compare_with_elmtune(pipeline, *load(str(tmp_path / "b"), adapter_path=str(tmp_path / "a")))

    export_mlx(str(adapter), str(tmp_path / "a8"), adapter_only=True, base_output=str(tmp_path / "b8"), q_bits=8,
               q_group_size=32)
    model, _ = load(str(tmp_path / "b8"), adapter_path=str(tmp_path / "a8"))
    assert "scales" in model.transformer.layers[0].attn.qkv_proj.linear  # LoRA over a quantised layer
    ids = pipeline.prompt(PROMPTS[0]).input_ids
    with torch.no_grad():
        reference = pipeline.model(torch.tensor([ids])).logits[0].numpy()
    assert (np.array(model(mx.array([ids]))[0]).argmax(-1) == reference.argmax(-1)).mean() >= 0.75


def test_partial_layers_and_rslora_scale(tmp_path):
    """A PEFT adapter on the last layer only, with rsLoRA's scale (alpha / sqrt(r)) and random non-zero weights:
    mlx-lm's logits are base + adapter's (the first layer's modules mlx-lm adds keep lora_b = 0)."""
    mlx_lm()
    import mlx.core as mx
    from mlx_lm import load
    from peft import LoraConfig, get_peft_model

    from tests.helpers import save_tiny_base, tiny_model

    base = save_tiny_base(tmp_path / "base")
    config = LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=["qkv_proj", "proj_2"],
                        layers_to_transform=[1], layers_pattern="layers", init_lora_weights=False)
    peft_model = get_peft_model(tiny_model(), config)
    peft_model.save_pretrained(tmp_path / "adapter")
    summary = export_mlx(str(tmp_path / "adapter"), str(tmp_path / "a"), adapter_only=True, model=str(base))
    assert summary["adapter_config"]["num_layers"] == 1
    assert summary["adapter_config"]["lora_parameters"]["scale"] == 4.0  # 8 / sqrt(4)
    model, _ = load(str(base), adapter_path=str(tmp_path / "a"))
    ids = [1, 5, 9, 14, 20, 3]
    with torch.no_grad():
        reference = peft_model.eval()(torch.tensor([ids])).logits[0].numpy()
        plain = tiny_model()(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(reference - plain).max() > 0.1
    np.testing.assert_allclose(np.array(model(mx.array([ids]))[0]), reference, atol=1e-3, rtol=0)
