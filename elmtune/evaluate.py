"""``elmtune eval``: did fine-tuning help?  Base vs base + adapter on held-out records, side by side.

Per model: loss and perplexity on the answers (teacher-forced, mean over supervised tokens, exactly the
training objective) and, from plain greedy generations, exact match and ROUGE-L F1 (``rouge-score``).
Written as ``eval.json`` and ``eval.md``.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

from .data import DataSpec, EncodeStats, read_records
from .data.encode import encode_records
from .inference import Pipeline, SamplingOptions, complete, load_pipeline, prompt_fields

class _RougeTokenizer:
    """Words for Latin text, single characters for CJK (rouge-score's default drops CJK entirely)."""

    def tokenize(self, text: str) -> list[str]:
        return re.findall(r"[\u3000-\u9fff\uac00-\ud7af\uff00-\uffef]|[^\W_]+", text.lower())


def rouge_l(predictions: list[str], references: list[str]) -> float:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_RougeTokenizer())
    scores = [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references)]
    return sum(scores) / len(scores) if scores else 0.0


@torch.no_grad()
def answer_loss(model, examples, pad_id: int, batch_size: int = 16) -> float:
    """Mean cross-entropy per supervised token (answer + eos) over all examples."""
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        width = max(len(e.input_ids) for e in chunk)
        ids = torch.tensor([e.input_ids + [pad_id] * (width - len(e.input_ids)) for e in chunk], device=device)
        labels = torch.tensor([e.labels + [-100] * (width - len(e.labels)) for e in chunk], device=device)
        mask = (torch.arange(width, device=device)[None] < torch.tensor([len(e.input_ids) for e in chunk],
                                                                          device=device)[:, None]).long()
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        targets = labels[:, 1:]
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100,
                                 reduction="sum").item()
        count += int((targets != -100).sum())
    return total / max(count, 1)


def evaluate_model(pipeline: Pipeline, examples, records, max_new_tokens: int, use_adapter: bool) -> dict:
    model = pipeline.model
    context = model.disable_adapter() if (not use_adapter and hasattr(model, "disable_adapter")) else nullcontext()
    with context:
        loss = answer_loss(model, examples, pipeline.tokenizer.pad_id)
        prompts = [pipeline.render(i, x) for i, x, _ in records]
        outputs = complete(pipeline, prompts, SamplingOptions(max_new_tokens=max_new_tokens, repetition_penalty=1.0))
    predictions = [o.output.strip() for o in outputs]
    references = [r[2].strip() for r in records]
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)),
            "exact_match": sum(p == r for p, r in zip(predictions, references)) / len(references),
            "rouge_l": rouge_l(predictions, references), "samples": [
                {"prompt": p, "reference": r, "prediction": o} for p, r, o in
                zip(prompts[:5], references[:5], predictions[:5])]}


def run_eval(data: list[str], adapter: str, output_dir: str, model: str | None = None, tokenizer: str | None = None,
             template: str | None = None, fields: str | None = None, max_new_tokens: int = 128,
             limit: int | None = None, dtype: str | torch.dtype = "auto", device: str = "auto") -> dict:
    pipeline = load_pipeline(model=model, adapter=adapter, tokenizer=tokenizer, template=template, dtype=dtype,
                             device=device)
    meta = pipeline.metadata
    spec = DataSpec(pipeline.template, prompt_fields(meta, fields), int(meta.get("max_length", 384)))
    raw = list(itertools.islice(read_records(data), limit))  # read once, and only as far as --limit
    examples = encode_records(raw, pipeline.tokenizer, spec, EncodeStats())
    by_place = {(r.source, r.index): r for r in raw}  # examples left without an answer are dropped: pair by place
    records = [spec.fields.extract(by_place[(e.source, e.index)]) for e in examples]
    if not examples:
        raise ValueError(f"no records with an answer to evaluate in {', '.join(data)}")
    report = {"data": data, "adapter": adapter, "n": len(records),
              "base": evaluate_model(pipeline, examples, records, max_new_tokens, use_adapter=False),
              "adapter_model": evaluate_model(pipeline, examples, records, max_new_tokens, use_adapter=True)}
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
    (out / "eval.md").write_text(markdown(report), encoding="utf-8")
    return report


def markdown(report: dict) -> str:
    base, tuned = report["base"], report["adapter_model"]
    rows = [("answer loss", "loss", "{:.4f}"), ("answer perplexity", "perplexity", "{:.2f}"),
            ("exact match", "exact_match", "{:.1%}"), ("ROUGE-L F1", "rouge_l", "{:.3f}")]
    lines = [f"# Evaluation on {', '.join(report['data'])} ({report['n']} records)", "",
             "| metric | base | base + adapter |", "|---|---|---|"]
    lines += [f"| {label} | {fmt.format(base[key])} | {fmt.format(tuned[key])} |" for label, key, fmt in rows]
    lines += ["", "## Samples (base + adapter)", ""]
    lines += [f"- `{s['prompt']}` → `{s['prediction']}` (reference: `{s['reference']}`)" for s in tuned["samples"]]
    return "\n".join(lines) + "\n"
