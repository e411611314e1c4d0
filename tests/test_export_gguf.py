"""``elmtune export gguf``: the file llama.cpp's ``openelm`` architecture expects — and the same greedy tokens."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from elmtune.export_gguf import ExportError, export_gguf
from elmtune.merge import merge
from elmtune.models.loading import load_model
from tests.helpers import tiny_model, train_tiny_adapter, word_tokenizer

NO_EMBEDDING = ["qkv_proj", "out_proj", "proj_1", "proj_2"]


def field(reader: gguf.GGUFReader, key: str):
    value = reader.fields[key]
    parts = [value.parts[i] for i in value.data]
    if value.types[0] == gguf.GGUFValueType.STRING:
        return bytes(parts[0]).decode()
    if value.types[0] == gguf.GGUFValueType.ARRAY:
        return [p.tolist()[0] for p in parts]
    return parts[0].tolist()[0]


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    directory = tmp_path_factory.mktemp("export")
    _, adapter = train_tiny_adapter(directory, lora_targets=NO_EMBEDDING)
    merge(str(adapter), str(directory / "merged"))
    return directory / "merged"


@pytest.mark.parametrize("file_type, weight_type", [("f32", "F32"), ("f16", "F16"), ("q8_0", "Q8_0")])
def test_header_and_tensors_are_what_llama_cpp_openelm_reads(merged, tmp_path, file_type, weight_type):
    out = tmp_path / "m.gguf"
    export_gguf(str(merged), str(out), file_type)
    model = load_model(str(merged))
    config = model.config
    reader = gguf.GGUFReader(out)
    assert field(reader, "general.architecture") == "openelm"
    assert field(reader, "openelm.block_count") == 2
    assert field(reader, "openelm.embedding_length") == 64
    assert field(reader, "openelm.attention.head_count") == config.num_query_heads
    assert field(reader, "openelm.attention.head_count_kv") == config.num_kv_heads
    assert field(reader, "openelm.feed_forward_length") == [config.ffn_dim(i) for i in range(2)]
    assert field(reader, "openelm.rope.dimension_count") == 16
    assert field(reader, "tokenizer.ggml.model") == "llama"
    assert field(reader, "tokenizer.ggml.bos_token_id") == 1 and field(reader, "tokenizer.ggml.eos_token_id") == 2
    assert len(reader.fields["tokenizer.ggml.tokens"].data) == config.vocab_size

    tensors = {t.name: t for t in reader.tensors}
    expected = {"token_embd.weight": (96, 64), "output_norm.weight": (64,)}
    for i in range(2):
        q, kv, ffn = config.num_query_heads[i], config.num_kv_heads[i], config.ffn_dim(i)
        expected |= {f"blk.{i}.attn_norm.weight": (64,), f"blk.{i}.attn_qkv.weight": ((q + 2 * kv) * 16, 64),
                     f"blk.{i}.attn_q_norm.weight": (16,), f"blk.{i}.attn_k_norm.weight": (16,),
                     f"blk.{i}.attn_output.weight": (64, q * 16), f"blk.{i}.ffn_norm.weight": (64,),
                     f"blk.{i}.ffn_gate.weight": (ffn, 64), f"blk.{i}.ffn_up.weight": (ffn, 64),
                     f"blk.{i}.ffn_down.weight": (64, ffn)}
    assert set(tensors) == set(expected)  # and no separate output.weight: llama.cpp uses token_embd
    for name, shape in expected.items():
        assert tuple(int(d) for d in reversed(tensors[name].shape)) == shape, name  # GGUF lists dims innermost first
        assert tensors[name].tensor_type.name == (weight_type if len(shape) == 2 else "F32"), name
    if file_type == "f32":  # values survive: the gate half of proj_1 is ffn_gate
        gate = np.asarray(tensors["blk.1.ffn_gate.weight"].data).reshape(config.ffn_dim(1), 64)
        proj_1 = model.transformer.layers[1].ffn.proj_1.weight.detach().numpy()
        assert np.array_equal(gate, proj_1[: config.ffn_dim(1)])


def test_untied_head_is_refused_unless_folded(tmp_path):
    _, adapter = train_tiny_adapter(tmp_path)  # tutorial targets: the embedding is adapted
    merge(str(adapter), str(tmp_path / "merged"))
    with pytest.raises(ExportError, match="--lora-targets.*--fold-head"):
        export_gguf(str(tmp_path / "merged"), str(tmp_path / "m.gguf"))
    assert not (tmp_path / "m.gguf").exists()
    summary = export_gguf(str(tmp_path / "merged"), str(tmp_path / "m.gguf"), fold_head=True)
    assert summary["max_logit_change_from_fold"] > 0


def test_configs_llama_cpp_cannot_run_are_refused(tmp_path):
    tiny_model(normalize_qk_projections=False).save_pretrained(tmp_path)
    word_tokenizer().save(tmp_path)
    with pytest.raises(ExportError, match="q/k norms"):
        export_gguf(str(tmp_path), str(tmp_path / "m.gguf"))


@pytest.mark.slow
def test_llama_cpp_greedy_tokens_equal_ours(merged, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed (scripts/check-llama-cpp.sh)")
    out = tmp_path / "m.gguf"
    export_gguf(str(merged), str(out), "f32")
    ours = load_model(str(merged)).eval()
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=128, n_threads=2, logits_all=False, verbose=False)
    prompts = [[1, 5, 9, 17], [1, 40, 41, 42, 43, 44], [1, 3], [1, 60, 7, 7, 7, 20, 21, 22]]
    for prompt in prompts:
        with torch.no_grad():
            expected = ours.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                                     eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        llm.reset()
        got = []
        for token in llm.generate(prompt, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
            got.append(token)
            if len(got) == len(expected):
                break
        assert got == expected, prompt
    # the embedded tokenizer: llama.cpp splits text exactly as our SentencePiece model does
    tokenizer = word_tokenizer()
    for text in ["say a b", "hello hi x y z", "say<sep>a"]:
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == [1] + tokenizer.encode([text])[0], text
