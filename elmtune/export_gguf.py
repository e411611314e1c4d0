"""``elmtune export gguf``: a merged (or base) OpenELM directory → one GGUF file for llama.cpp / Ollama.

Written with the ``gguf`` package for llama.cpp's ``openelm`` architecture, the SentencePiece tokenizer embedded.
What llama.cpp's ``openelm`` can run, and so what we refuse to export:

* the output head is always ``token_embd`` (there is no separate output tensor): a checkpoint with its own
  ``lm_head`` (e.g. a merge whose embedding was LoRA-adapted) cannot be represented exactly.  It is refused,
  unless ``fold_head`` is given: then the head becomes the (adapted) embedding and the measured max logit
  change is reported;
* q/k norms, the gated (GLU) SiLU feed-forward and RMSNorm are required.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

FILE_TYPES = ("f32", "f16", "q8_0")
_PROBE = [[1, 2, 3, 4, 5, 6, 7, 8], [1, 100, 200, 300, 17, 42]]


class ExportError(ValueError):
    pass


def check_supported(config) -> None:
    problems = []
    if not config.normalize_qk_projections:
        problems.append("normalize_qk_projections is false (llama.cpp's openelm needs q/k norms)")
    if not config.ffn_with_glu:
        problems.append("ffn_with_glu is false (llama.cpp's openelm needs the gated FFN)")
    if config.activation_fn_name not in ("swish", "silu"):
        problems.append(f"activation {config.activation_fn_name!r} (llama.cpp's openelm uses SiLU)")
    if problems:
        raise ExportError("llama.cpp cannot run this model: " + "; ".join(problems))


@torch.no_grad()
def measure_head_fold(model, device: str = "auto") -> float:
    """Max |Δlogit| on probe inputs when the untied head is replaced by the input embedding (in fp32, on
    ``device``; the model is back on the CPU afterwards)."""
    from .device import pick_device

    target = pick_device(device)
    vocab = model.config.vocab_size
    ids = torch.tensor([[t % vocab for t in row] for row in _PROBE[:1]], device=target)
    try:
        hidden = model.to(target).transformer(ids).last_hidden_state  # one pass; both heads read the same states
        exact = hidden @ model.lm_head.weight.T
        folded = hidden @ model.transformer.token_embeddings.weight.T
        return (exact - folded).abs().max().item()
    finally:
        model.to("cpu")


def _vocab(tokenizer_dir: Path, n_vocab: int):
    import gguf

    if not (tokenizer_dir / "tokenizer.model").is_file():
        raise ExportError(f"{tokenizer_dir}: no tokenizer.model (SentencePiece) to embed; pass --tokenizer DIR")
    vocab = gguf.SentencePieceVocab(tokenizer_dir)
    tokens, scores, types = [], [], []
    user_defined = _user_defined_pieces(tokenizer_dir / "tokenizer.model")
    for i, (text, score, kind) in enumerate(vocab.all_tokens()):
        tokens.append(text)
        scores.append(score)
        types.append(gguf.TokenType.USER_DEFINED if i in user_defined else kind)
    if len(tokens) > n_vocab:
        raise ExportError(f"the tokenizer has {len(tokens)} pieces but the model only {n_vocab} embeddings")
    for i in range(len(tokens), n_vocab):  # embedding rows beyond the tokenizer: unused
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    return tokens, scores, types


def _user_defined_pieces(model_file: Path) -> set[int]:
    """Pieces declared USER_DEFINED in the SentencePiece model (e.g. a ``<sep>`` symbol): llama.cpp must keep
    them whole when tokenizing text."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(model_file.read_bytes())
    return {i for i, p in enumerate(proto.pieces) if p.type == pb.ModelProto.SentencePiece.USER_DEFINED}


def _tensor_data(name: str, tensor: torch.Tensor, file_type: str):
    """(numpy data, raw ggml type or None) for one tensor; norms and odd-sized rows stay in float32."""
    import gguf

    array = tensor.detach().to(torch.float32).cpu().numpy()
    if file_type == "f32" or array.ndim == 1:
        return array, None
    if file_type == "q8_0" and array.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
        return gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    return array.astype(np.float16), None


def export_gguf(model_dir: str, output: str, file_type: str = "f16", tokenizer: str | None = None,
                fold_head: bool = False, device: str = "auto") -> dict:
    """Write ``output`` (a .gguf file); returns a summary (tensors, size, any measured head change)."""
    import gguf

    from .models.loading import load_model

    if file_type not in FILE_TYPES:
        raise ExportError(f"--type {file_type!r}: choose one of {', '.join(FILE_TYPES)}")
    model = load_model(model_dir, dtype=torch.float32).eval()
    config = model.config
    check_supported(config)
    summary: dict = {"output": output, "type": file_type}
    if model.lm_head is not None:
        if torch.equal(model.lm_head.weight, model.transformer.token_embeddings.weight):
            summary["head"] = "untied in the checkpoint but identical to the embedding: exported as tied"
        elif not fold_head:
            raise ExportError(
                "this model has its own output head (share_input_output_layers: false, e.g. a merge whose "
                "token_embeddings were LoRA-adapted), and llama.cpp's openelm always uses the input embedding as "
                "the head, so the GGUF would be a different model. Ways out: train without token_embeddings in "
                "--lora-targets, or pass --fold-head to use the adapted embedding as the head (the export then "
                "reports the measured logit change)")
        else:
            summary["max_logit_change_from_fold"] = measure_head_fold(model, device)

    L = config.num_transformer_layers
    ffn_dims = [config.ffn_dim(i) for i in range(L)]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.OPENELM, L)
    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[file_type]
    out = Path(output)
    tmp = out.with_name(out.name + ".tmp")
    writer = gguf.GGUFWriter(str(tmp), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.OPENELM])
    writer.add_name(Path(model_dir).name)
    writer.add_block_count(L)
    writer.add_context_length(config.max_context_length)
    writer.add_embedding_length(config.model_dim)
    writer.add_feed_forward_length(ffn_dims)
    writer.add_head_count(list(config.num_query_heads))
    writer.add_head_count_kv(list(config.num_kv_heads))
    writer.add_rope_freq_base(float(config.rope_freq_constant))
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_file_type(ftype)

    tokenizer_dir = Path(tokenizer or model_dir)
    tokens, scores, types = _vocab(tokenizer_dir, config.vocab_size)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    gguf.SpecialVocab(tokenizer_dir, load_merges=False, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)

    count = 0
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            continue  # folded (or identical): llama.cpp uses token_embd as the head
        layer = name.split(".")[2] if name.startswith("transformer.layers.") else None
        if name.endswith("ffn.proj_1.weight"):
            # proj_1 stacks [gate | up] along its output dim; llama.cpp keeps them as two tensors
            gate, up = tensor.split(ffn_dims[int(layer)], dim=0)
            pieces = [(f"blk.{layer}.ffn_gate.weight", gate), (f"blk.{layer}.ffn_up.weight", up)]
        else:
            mapped = names.get_name(name, try_suffixes=(".weight",))
            if mapped is None:
                raise ExportError(f"no GGUF name for tensor {name!r}")
            pieces = [(mapped, tensor)]
        for gguf_name, piece in pieces:
            data, raw = _tensor_data(gguf_name, piece, file_type)
            writer.add_tensor(gguf_name, data, raw_dtype=raw)
            count += 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, out)
    summary.update(tensors=count, bytes=out.stat().st_size)
    return summary
