"""Test helpers: the read-only ``../shared`` folder beside the checkout, and tiny random models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import elmtune  # noqa: F401  (registers the OpenELM Auto classes)
from elmtune import OpenELMConfig, OpenELMForCausalLM

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"


def shared_path(*parts: str) -> Path:
    """A path under ``../shared``; the test is skipped, saying what is missing, when it is absent."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"needs {path} (the read-only shared/ folder beside the checkout); not found")
    return path


def tiny_config(**overrides) -> OpenELMConfig:
    """A 2-layer OpenELM with Apple's recipe (GQA, q/k norms, GLU, per-layer widths), small enough for CPU tests."""
    fields = dict(vocab_size=96, model_dim=64, head_dim=16, num_transformer_layers=2, num_gqa_groups=2,
                  qkv_multipliers=[0.5, 1.0], ffn_multipliers=[0.5, 4.0], ffn_dim_divisor=32,
                  normalize_qk_projections=True, share_input_output_layers=True, rope_max_length=4096)
    return OpenELMConfig(**{**fields, **overrides})


def tiny_model(seed: int = 0, **overrides) -> OpenELMForCausalLM:
    torch.manual_seed(seed)
    model = OpenELMForCausalLM(tiny_config(**overrides))
    # transformers' default init (std 0.02) gives near-uniform logits; widen it so argmax decisions are sharp
    # and comparisons between code paths are meaningful.
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1:
                p.normal_(0.0, 0.3)
    return model.eval()


def word_tokenizer(words: str = "a b c d e f g h hi hello say answer x y z 1 2 10") -> "elmtune.tokenizer.Tokenizer":
    """A tiny word-level SentencePiece tokenizer (unk 0, bos 1, eos 2), trained in a temp dir: no downloads."""
    import io
    import json
    import tempfile

    import sentencepiece as spm

    from elmtune.tokenizer import load_tokenizer

    directory = Path(tempfile.mkdtemp(prefix="elmtune-tok-"))
    corpus = [f"{w} <sep>" for w in words.split()] * 3 + [words]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_writer=model, vocab_size=48,
                                   model_type="bpe", unk_id=0, bos_id=1, eos_id=2,
                                   pad_id=-1, minloglevel=2, num_threads=1)
    (directory / "tokenizer.model").write_bytes(model.getvalue())
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    return load_tokenizer(str(directory))


def write_jsonl(path: Path, records) -> str:
    """``records`` as a JSONL file at ``path`` (UTF-8, non-ASCII kept as is); returns the path as a string."""
    import json

    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return str(path)


def save_tiny_base(directory: Path) -> Path:
    """A tiny model with its word tokenizer saved in ``directory`` (Apple's layout); returns the directory."""
    tiny_model().save_pretrained(directory)
    word_tokenizer().save(directory)
    return directory


def write_varied_records(path: Path, n: int) -> Path:
    """``n`` instruction records (fields instruction/input/output) of varied prompt and answer lengths, as JSONL."""
    import json

    words = "a b c d e f g h x y z hello".split()
    records = [{"instruction": "say " * (1 + i % 3), "input": " ".join(words[i % 7: i % 7 + 1 + i % 4]),
                "output": " ".join(words[(i * 5) % 11: (i * 5) % 11 + 1 + i % 3])} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def tiny_run_inputs(directory: Path, n_records: int) -> tuple[Path, Path]:
    """A tiny base (``directory/base``) and ``n_records`` varied records (``directory/data.jsonl``) to train on."""
    return save_tiny_base(Path(directory) / "base"), write_varied_records(Path(directory) / "data.jsonl", n_records)


def train_tiny_adapter(directory: Path, **overrides) -> tuple[Path, Path]:
    """Train a tiny LoRA adapter for a few steps (tiny model + word tokenizer + generated data) in
    ``directory``; returns (base model directory, adapter directory)."""
    import json

    from elmtune.training import TrainOptions, train

    directory = Path(directory)
    model_dir = save_tiny_base(directory / "base")
    words = "a b c d e f g h x y z".split()
    data = directory / "data.jsonl"
    data.write_text("".join(json.dumps({"instruction": "say", "input": " ".join(words[i % 9:i % 9 + 2]),
                                        "output": words[(i * 5) % 11]}) + "\n" for i in range(32)))
    options = dict(model=str(model_dir), data=[str(data)], fields="zh", output_dir=str(directory / "adapter"),
                   max_length=32, batch_size=8, grad_accum=1, lr=5e-2, max_steps=4, save_steps=100, logging_steps=1,
                   precision="fp32", gradient_checkpointing="off", lora_r=4, lora_alpha=8, lora_dropout=0.0)
    train(TrainOptions(**{**options, **overrides}))
    return model_dir, directory / "adapter"


def write_conversations(path: Path, n: int) -> Path:
    """``n`` multi-turn ``messages`` records, each with a system message and two exchanges, as JSONL."""
    import json

    words = "a b c d e f g h x y z".split()
    records = [{"messages": [
        {"role": "system", "content": "answer " + words[i % 3]},
        {"role": "user", "content": "say " + " ".join(words[i % 9:i % 9 + 2])},
        {"role": "assistant", "content": words[(i * 5) % 11]},
        {"role": "user", "content": "say " + words[(i + 4) % 11]},
        {"role": "assistant", "content": " ".join(words[(i * 3) % 10:(i * 3) % 10 + 2])}]} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def train_chat_adapter(directory: Path, **overrides) -> tuple[Path, Path]:
    """:func:`train_tiny_adapter` on 32 multi-turn conversations with system messages (``directory/chat.jsonl``);
    returns (base model directory, adapter directory)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    data = write_conversations(directory / "chat.jsonl", 32)
    return train_tiny_adapter(directory, **{"data": [str(data)], "max_length": 64, **overrides})


#: A chat template in the word tokenizer's vocabulary (unlike openelm's or ChatML's markers): system text after
#: "z", user turns after "hi", assistant turns after "hello" (the generation prompt) and closed by eos.
WORD_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ 'z ' + m['content'] + ' ' }}"
    "{% elif m['role'] == 'user' %}{{ 'hi ' + m['content'] + ' ' }}{% else %}{{ 'hello ' }}{% generation %}"
    "{{ m['content'] + eos_token }}{% endgeneration %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'hello ' }}{% endif %}"
)


def trained_prefix(adapter: Path, messages: list[dict]) -> list[int]:
    """The token ids training puts before the last assistant turn of ``messages``: the conversation encoded by
    the training code (``encode_records``) with the data options the adapter was trained with (its
    ``config.yaml``) and its own tokenizer, cut where the last supervised run starts."""
    from elmtune.data import IGNORE_INDEX, DataSpec, EncodeStats, Record
    from elmtune.data.encode import encode_records
    from elmtune.options import resolve
    from elmtune.tokenizer import load_tokenizer
    from elmtune.training.args import DataOptions, TrainOptions

    train_only = set(TrainOptions.__dataclass_fields__) - set(DataOptions.__dataclass_fields__)
    options = resolve(DataOptions, yaml_path=Path(adapter) / "config.yaml", yaml_ignore=train_only)
    spec = DataSpec.from_options(options)
    [example] = encode_records([Record("conversation", 0, {"messages": messages})], load_tokenizer(str(adapter)),
                               spec, EncodeStats())
    labels = example.labels
    start = max(n for n in range(1, len(labels)) if labels[n] != IGNORE_INDEX and labels[n - 1] == IGNORE_INDEX)
    return example.input_ids[:start]


class Interrupt(Exception):
    """Raised by :class:`StopAt`: a run "interrupted" after a given step."""


def stop_at(step: int):
    """A Trainer callback that interrupts training (raises :class:`Interrupt`) after optimizer step ``step``."""
    from transformers import TrainerCallback

    class StopAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == step:
                raise Interrupt

    return StopAt()
