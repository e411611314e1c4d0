"""``elmtune demo``: the whole pipeline, offline, on a laptop CPU, in a few minutes.

1. Generate an instruction dataset with a checkable answer: *reverse the order of the words*.
2. Train a SentencePiece tokenizer on the generated text (Llama-style ids: unk 0, bos 1, eos 2).
3. Build a tiny OpenELM with Apple's recipe (GQA, q/k norms, per-layer widths), random init, saved in Apple's
   checkpoint layout.
4. LoRA-train it through the very same code path as ``elmtune train`` (template ``openelm-sep``).
5. Measure held-out exact match of greedy answers, base vs base + adapter, and show a few samples.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .options import SEED_MAX, opt

WORDS = ("red blue green black white pink gray gold cat dog fox owl bee cow pig hen "
         "sun moon star rain snow wind tree leaf").split()
INSTRUCTION = "Reverse the order of these words: "


@dataclass
class DemoOptions:
    output_dir: str = opt("elmtune-demo", "where the dataset, tokenizer, base model, adapter and summary go",
                          short="-o")
    # make_task draws distinct sequences of 3-5 of the 24 words, and there are 5,367,648 of them: together the two
    # maxima stay below that, so the drawing always ends.
    train_examples: int = opt(20000, "generated training examples", minimum=1, maximum=5_000_000)
    heldout_examples: int = opt(200, "generated held-out examples (word sequences never seen in training)",
                                minimum=1, maximum=100_000)
    max_steps: int = opt(1000, "LoRA optimizer steps", minimum=1)
    seed: int = opt(0, "seed for data, model and training", minimum=0, maximum=SEED_MAX)
    overwrite: bool = opt(True, "replace an earlier demo in --output-dir")


def make_task(n_train: int, n_heldout: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Disjoint train / held-out sets of 3–5 distinct words and their reversal."""
    rng = random.Random(seed)
    seen: set[tuple[str, ...]] = set()

    def sample(n: int) -> list[dict]:
        records = []
        while len(records) < n:
            words = tuple(rng.sample(WORDS, rng.randint(3, 5)))
            if words in seen:
                continue
            seen.add(words)
            records.append({"instruction": INSTRUCTION, "input": " ".join(words), "output": " ".join(reversed(words))})
        return records

    heldout = sample(n_heldout)
    return sample(n_train), heldout


def train_tokenizer(records: list[dict], directory: Path) -> None:
    """A small SentencePiece model on the generated text, loadable by ``AutoTokenizer`` like Llama-2's."""
    import io

    import sentencepiece as spm

    directory.mkdir(parents=True, exist_ok=True)
    corpus = [r["instruction"] + r["input"] + "<sep>" for r in records] + [r["output"] for r in records]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=model, vocab_size=128, model_type="bpe",
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        character_coverage=1.0, minloglevel=2, num_threads=1,
    )
    (directory / "tokenizer.model").write_bytes(model.getvalue())
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False, "legacy": True}, indent=2))


def build_base_model(vocab_size: int, directory: Path, seed: int) -> None:
    from .models import OpenELMConfig, OpenELMForCausalLM

    config = OpenELMConfig(vocab_size=vocab_size, model_dim=128, head_dim=16, num_transformer_layers=3,
                           num_gqa_groups=2, qkv_multipliers=[0.5, 1.0], ffn_multipliers=[1.0, 2.0],
                           ffn_dim_divisor=64, normalize_qk_projections=True, share_input_output_layers=True,
                           max_context_length=256, initializer_range=0.1)
    torch.manual_seed(seed)
    OpenELMForCausalLM(config).save_pretrained(directory)


def exact_match(pipeline, records: list[dict]) -> tuple[float, list[str]]:
    """Held-out exact match of plain greedy answers."""
    from .inference import SamplingOptions, complete

    prompts = [pipeline.render(r["instruction"], r["input"]) for r in records]
    results = complete(pipeline, prompts, SamplingOptions(max_new_tokens=16, repetition_penalty=1.0), batch_size=64)
    answers = [r.output.strip() for r in results]
    return sum(a == r["output"] for a, r in zip(answers, records)) / len(records), answers


def write_jsonl(records: list[dict], path: Path) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def run_demo(options: DemoOptions) -> dict:
    from .inference import load_pipeline
    from .tokenizer import load_tokenizer
    from .training import TrainOptions, train

    start = time.time()
    out = Path(options.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    train_records, heldout = make_task(options.train_examples, options.heldout_examples, options.seed)
    write_jsonl(train_records, out / "train.jsonl")
    write_jsonl(heldout, out / "heldout.jsonl")
    train_tokenizer(train_records, out / "base-model")
    tokenizer = load_tokenizer(str(out / "base-model"))
    build_base_model(len(tokenizer.hf), out / "base-model", options.seed)
    print(f"[demo] {len(train_records)} training / {len(heldout)} held-out examples, tokenizer of "
          f"{len(tokenizer.hf)} pieces, tiny OpenELM in {out / 'base-model'}")

    summary = train(TrainOptions(
        model=str(out / "base-model"), data=[str(out / "train.jsonl")], fields="zh", template="openelm-sep",
        output_dir=str(out / "adapter"), overwrite=options.overwrite, max_length=64, max_steps=options.max_steps,
        batch_size=32, grad_accum=1, lr=3e-3, lr_scheduler="cosine", warmup_steps=20, lora_r=32, lora_alpha=32,
        lora_dropout=0.0, precision="fp32", gradient_checkpointing="off", save_steps=options.max_steps,
        packing=False,  # 32 short examples of similar length: padding wastes little, per-example attention calls cost more
        logging_steps=25, seed=options.seed))

    pipeline = load_pipeline(adapter=str(out / "adapter"))  # base, tokenizer and template from the adapter
    with pipeline.model.disable_adapter():
        base_acc, _ = exact_match(pipeline, heldout)
    adapter_acc, answers = exact_match(pipeline, heldout)
    result = {"base_exact_match": base_acc, "adapter_exact_match": adapter_acc, "n_heldout": len(heldout),
              "seconds": round(time.time() - start, 1), "train_loss_first": summary.get("first_loss"),
              "train_loss_last": summary.get("last_loss"), "output_dir": str(out)}
    (out / "summary.json").write_text(json.dumps(result, indent=2), encoding="utf-8")

    print("\n[demo] samples (held-out):")
    for record, answer in list(zip(heldout, answers))[:5]:
        mark = "✓" if answer == record["output"] else "✗"
        print(f"  {mark} {record['input']!r:36} → {answer!r}")
    print(f"\n[demo] held-out exact match: base {base_acc:.1%} → base + adapter {adapter_acc:.1%} "
          f"({len(heldout)} examples, {result['seconds']} s)")
    print(f"[demo] adapter, loss curve and summary.json are in {out.resolve()}")
    return result
