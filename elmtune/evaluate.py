"""``elmtune eval``: did fine-tuning help?  Base vs base + adapter on held-out records, side by side.

Per model: loss and perplexity on the answers (teacher-forced, mean over supervised tokens, exactly the
training objective) and, from plain greedy generations, exact match and ROUGE-L F1 (``rouge-score``).
Written as ``eval.json`` and ``eval.md``.  With ``tasks``, the same two models are also scored on standard benchmarks
through lm-evaluation-harness (:mod:`elmtune.benchmarks`), in a ``benchmarks`` section of the same report; without
``data``, the report has that section only.

The answer of an alpaca record is its output (prompted as training prompted it, :meth:`Prompter.instruction`);
of a conversation (``messages``, ``sharegpt``), its last assistant turn, prompted with everything before it
rendered with the adapter's chat template; of a ``completion`` record, the completion after its prompt.  The loss
is taken on that answer alone (``--train-on last-turn``), so that it measures what the generations are scored
on.  ``text`` records have no answer and are refused.
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

from .data import DataError, DataSpec, EncodeStats, Record, RenderedPrompt, read_records, render_prompt
from .data.encode import encode_records
from .data.formats import CONVERSATION_FORMATS, FormatTracker, completion_of, conversation_of
from .inference import Pipeline, Prompter, SamplingOptions, complete, load_pipeline, prompt_fields


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


def evaluate_model(pipeline: Pipeline, examples, prompts: list[RenderedPrompt], references: list[str],
                   max_new_tokens: int, use_adapter: bool) -> dict:
    model = pipeline.model
    context = model.disable_adapter() if (not use_adapter and hasattr(model, "disable_adapter")) else nullcontext()
    with context:
        loss = answer_loss(model, examples, pipeline.tokenizer.pad_id)
        outputs = complete(pipeline, prompts, SamplingOptions(max_new_tokens=max_new_tokens, repetition_penalty=1.0))
    predictions = [o.output.strip() for o in outputs]
    references = [r.strip() for r in references]
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)),
            "exact_match": sum(p == r for p, r in zip(predictions, references)) / len(references),
            "rouge_l": rouge_l(predictions, references), "samples": [
                {"prompt": p.text, "reference": r, "prediction": o} for p, r, o in
                zip(prompts[:5], references[:5], predictions[:5])]}


def eval_case(record: Record, fmt: str, spec: DataSpec, prompter: Prompter) -> tuple[Record, RenderedPrompt, str]:
    """(the record to take the answer loss on, the generation prompt, the reference answer) of a held-out
    record in format ``fmt``; a record without an answer is a DataError."""
    if fmt == "alpaca":
        instruction, input_text, output = spec.fields.extract(record)
        prompt = prompter.instruction(instruction, input_text, where=record.where)
        if prompter.instructions_as_chat:  # prompted as a one-turn conversation: its loss taken as one too
            record = Record(record.source, record.index, {"messages": [
                {"role": "user", "content": instruction + input_text}, {"role": "assistant", "content": output}]})
        return record, prompt, output
    if fmt in CONVERSATION_FORMATS:
        messages = conversation_of(record, fmt, require_assistant_end=True)
        if len(messages) < 2:
            raise DataError(f"{record.where}: the conversation is one assistant turn: nothing to prompt with")
        prompt = render_prompt(messages[:-1], prompter.tokenizer, prompter.chat_template, where=record.where)
        return record, prompt, messages[-1]["content"]
    if fmt == "completion":
        prompt, completion = completion_of(record)
        return record, prompter.plain(prompt), completion
    raise DataError(f"{record.where}: a {fmt} record has no answer to compare with; eval takes alpaca, "
                    f"messages, sharegpt and completion records")


def compared(pipeline: Pipeline) -> tuple[tuple[str, bool], ...]:
    """(report key, adapter on) of each model eval scores: the base and base + adapter, or — loaded without an
    adapter (a merged or fully fine-tuned model, or any base) — the model alone, under ``model``."""
    if hasattr(pipeline.model, "disable_adapter"):
        return ("base", False), ("adapter_model", True)
    return (("model", False),)


#: eval.md's column titles for the report keys
TITLES = {"base": "base", "adapter_model": "base + adapter", "model": "model"}


def run_eval(data: list[str] | None, adapter: str | None, output_dir: str, model: str | None = None,
             tokenizer: str | None = None, template: str | None = None, fields: str | None = None,
             max_new_tokens: int = 128, limit: int | None = None, dtype: str | torch.dtype = "auto",
             device: str = "auto", chat_template: str | None = None, tasks: list[str] | None = None,
             include_path: list[str] | None = None, num_fewshot: int | None = None,
             batch_size: int | None = None) -> dict:
    """Base vs base + adapter (or a model alone) on held-out ``data`` and/or lm-eval ``tasks`` (at least one);
    ``limit`` caps both (records of ``data``, examples per task)."""
    if not data and not tasks:
        raise ValueError("nothing to evaluate: give held-out records (--data), benchmark tasks (--tasks), or both")
    bench_setup = None
    if tasks:  # tasks and their data are checked before the model loads: unknown or uncached ones fail fast
        from .benchmarks import prepare_tasks

        bench_setup = prepare_tasks(tasks, include_path)
    pipeline = load_pipeline(model=model, adapter=adapter, tokenizer=tokenizer, template=template, dtype=dtype,
                             device=device, chat_template=chat_template)
    report: dict = {"data": data or [], "adapter": adapter}
    if data:
        report.update(_heldout_report(pipeline, data, fields, max_new_tokens, limit))
    if bench_setup:
        from .benchmarks import DEFAULT_BATCH_SIZE, run_benchmarks

        report["benchmarks"] = run_benchmarks(pipeline, tasks, include_path, num_fewshot, limit,
                                              batch_size or DEFAULT_BATCH_SIZE, loaded=bench_setup)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
    (out / "eval.md").write_text(markdown(report), encoding="utf-8")
    return report


def _heldout_report(pipeline: Pipeline, data: list[str], fields: str | None, max_new_tokens: int,
                    limit: int | None) -> dict:
    meta, prompter = pipeline.metadata, pipeline.prompter
    spec = DataSpec(prompter.template, prompt_fields(meta, fields), int(meta.get("max_length", 384)),
                    chat_template=prompter.chat_template, train_on="last-turn")
    raw = list(itertools.islice(read_records(data), limit))  # read once, and only as far as --limit
    formats = FormatTracker()
    cases = [eval_case(r, formats.format_of(r, spec.fields), spec, prompter) for r in raw]
    examples = encode_records([record for record, _, _ in cases], pipeline.tokenizer, spec, EncodeStats())
    if not examples:
        raise ValueError(f"no records with an answer to evaluate in {', '.join(data)}")
    by_place = {(r.source, r.index): (p, a) for r, p, a in cases}  # examples left without an answer are dropped
    prompts = [by_place[(e.source, e.index)][0] for e in examples]
    references = [by_place[(e.source, e.index)][1] for e in examples]
    return {"n": len(examples),
            **{key: evaluate_model(pipeline, examples, prompts, references, max_new_tokens, use_adapter=tuned)
               for key, tuned in compared(pipeline)}}


def markdown(report: dict) -> str:
    title = "# Evaluation" + (f" of {report['adapter']} against its base model" if report.get("adapter") else "")
    parts = _heldout_markdown(report) if report.get("data") else [title + "\n"]
    if "benchmarks" in report:
        from .benchmarks import markdown as benchmarks_markdown

        parts.append(benchmarks_markdown(report["benchmarks"]))
    return "\n".join(parts)


def _heldout_markdown(report: dict) -> list[str]:
    keys = [key for key in TITLES if key in report]
    rows = [("answer loss", "loss", "{:.4f}"), ("answer perplexity", "perplexity", "{:.2f}"),
            ("exact match", "exact_match", "{:.1%}"), ("ROUGE-L F1", "rouge_l", "{:.3f}")]
    lines = [f"# Evaluation on {', '.join(report['data'])} ({report['n']} records)", "",
             "| metric | " + " | ".join(TITLES[k] for k in keys) + " |", "|---" * (len(keys) + 1) + "|"]
    lines += [f"| {label} | " + " | ".join(fmt.format(report[k][key]) for k in keys) + " |"
              for label, key, fmt in rows]
    lines += ["", f"## Samples ({TITLES[keys[-1]]})", ""]
    lines += [f"- `{s['prompt']}` → `{s['prediction']}` (reference: `{s['reference']}`)"
              for s in report[keys[-1]]["samples"]]
    return ["\n".join(lines) + "\n"]
