"""``elmtune eval --tasks``: lm-evaluation-harness benchmarks, base vs base + adapter in eval.json / eval.md.

The task is defined here, offline: a multiple-choice YAML over a local JSONL file whose right answer is always
"hello" and whose wrong answer is often a word of the question (which an untrained tied-embedding model tends to
repeat).  A tiny adapter trained for a few steps on matching completions solves it; the scores are checked against
lm-eval's stock HF wrapper loading our checkpoints from disk, and against log-likelihoods computed by hand."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from elmtune.cli import main
from tests.helpers import save_tiny_base

WORDS = "a b c d e f g h x y z".split()
TASK_YAML = """task: {name}
dataset_path: {dataset_path}
{dataset_lines}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}} answer"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
fewshot_delimiter: " "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def write_task(directory: Path, n: int = 16) -> Path:
    """``directory/hello.yaml`` (task ``say_hello``) over ``directory/docs.jsonl``: ``n`` questions "say X Y",
    choices "hello" and a distractor (the question's Y for even docs, another word for odd ones).  Few-shot
    examples are joined by a space, not lm-eval's default blank line: the word tokenizer's SentencePiece model
    normalises newlines to spaces (its nmt_nfkc rule) and its transformers conversion does not, so the stock
    wrapper's tokens would differ from ours there (Llama-2's tokenizer keeps newlines in both: they agree)."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(2)
    docs = []
    for i in range(n):
        x, y, other = rng.sample(WORDS, 3)
        choices = ["hello", y if i % 2 == 0 else other]
        if (i // 2) % 2:
            choices.reverse()
        docs.append({"question": f"say {x} {y}", "choices": choices, "label": choices.index("hello")})
    (directory / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (directory / "hello.yaml").write_text(TASK_YAML.format(
        name="say_hello", dataset_path="json",
        dataset_lines=f"dataset_kwargs:\n  data_files:\n    test: {directory / 'docs.jsonl'}"))
    return directory


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny base and an adapter trained for 8 steps on completions "say X Y answer" → " hello"."""
    from elmtune.training import TrainOptions, train

    directory = tmp_path_factory.mktemp("bench")
    base = save_tiny_base(directory / "base")
    rng = random.Random(1)
    data = directory / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": "say {} {} answer".format(*rng.sample(WORDS, 2)),
                                        "completion": " hello"}) + "\n" for _ in range(32)))
    train(TrainOptions(model=str(base), data=[str(data)], output_dir=str(directory / "adapter"), max_length=32,
                       batch_size=16, grad_accum=1, lr=5e-2, max_steps=8, save_steps=100, logging_steps=1,
                       precision="fp32", gradient_checkpointing="off", lora_r=8, lora_alpha=16, lora_dropout=0.0))
    return base, directory / "adapter"


def test_tasks_without_lm_eval_fail_in_one_line_naming_the_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` raises ImportError
    assert main(["eval", "-a", str(tmp_path), "--tasks", "arc_easy", "-o", str(tmp_path / "out")]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("elmtune eval: error: --tasks needs lm-evaluation-harness")
    assert "pip install 'elmtune[lm-eval]'" in line


def test_eval_needs_data_or_tasks(tmp_path, capsys):
    assert main(["eval", "-a", str(tmp_path)]) == 2
    assert "give held-out records (--data), benchmark tasks (--tasks), or both" in capsys.readouterr().err


def hand_accuracy(model, tok, docs: list[dict]) -> tuple[float, list[list[float]]]:
    """Accuracy of argmax_choice sum log p(choice | context), computed directly with ``model``: context =
    [bos] + the question's tokens, choice = its tokens as a continuation (as elmtune encodes completions).  All
    (document, choice) rows in one right-padded batch: causal attention never looks at the padding after a row."""
    rows = []
    for doc in docs:
        context = [tok.bos_id] + tok.encode([doc["question"] + " answer"])[0]
        rows += [(context, tok.encode_continuation([" " + choice])[0]) for choice in doc["choices"]]
    width = max(len(c) + len(k) for c, k in rows)
    ids = torch.tensor([c + k + [tok.pad_id] * (width - len(c) - len(k)) for c, k in rows])
    with torch.no_grad():
        logp = model(input_ids=ids).logits.float().log_softmax(-1)
    flat = [sum(logp[r, len(c) - 1 + i, t].item() for i, t in enumerate(k)) for r, (c, k) in enumerate(rows)]
    scores, correct, start = [], 0, 0
    for doc in docs:
        row = flat[start:start + len(doc["choices"])]
        start += len(row)
        scores.append(row)
        correct += max(range(len(row)), key=row.__getitem__) == doc["label"]
    return correct / len(docs), scores


def test_eval_tasks_on_a_local_task_base_vs_adapter(trained, tmp_path, capsys):
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install 'elmtune[lm-eval]')")
    from lm_eval.api.instance import Instance

    from elmtune.benchmarks import elmtune_lm
    from elmtune.inference import SamplingOptions, complete, load_pipeline

    base, adapter = trained
    task = write_task(tmp_path / "task")
    out = tmp_path / "eval"
    assert main(["eval", "-a", str(adapter), "--tasks", "say_hello", "--include-path", str(task), "-o", str(out),
                 "--device", "cpu", "--dtype", "float32", "--batch-size", "4"]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "eval.json").read_text())
    assert "base" not in report and report["data"] == []  # --tasks alone: only the benchmarks
    bench = report["benchmarks"]
    assert bench["tasks"] == ["say_hello"] and bench["num_fewshot"] is None and bench["limit"] is None
    row = bench["results"]["say_hello"]
    assert row["n"] == 16
    base_acc, tuned_acc = row["base"]["acc"], row["adapter_model"]["acc"]
    assert tuned_acc >= 0.75 and tuned_acc >= base_acc + 0.5, (base_acc, tuned_acc)
    line = f"| say_hello | acc | 16 | {base_acc:.4f} ± {row['base_stderr']['acc']:.4f} | {tuned_acc:.4f}"
    assert line in (out / "eval.md").read_text() and line in printed

    # by hand, with our model: the same choices, hence the same accuracies
    docs = [json.loads(line) for line in (task / "docs.jsonl").read_text().splitlines()]
    pipeline = load_pipeline(adapter=str(adapter), device="cpu", dtype="float32")
    tuned_hand, tuned_scores = hand_accuracy(pipeline.model, pipeline.tokenizer, docs)
    with pipeline.model.disable_adapter():
        base_hand, base_scores = hand_accuracy(pipeline.model, pipeline.tokenizer, docs)
    assert (base_hand, tuned_hand) == (base_acc, tuned_acc)
    # and lm-eval's log-likelihoods through our wrapper equal the hand-computed ones (three documents)
    lm = elmtune_lm(pipeline, batch_size=4)
    requests = [Instance("loglikelihood", doc, (doc["question"] + " answer", " " + choice), i)
                for doc in docs[:3] for i, choice in enumerate(doc["choices"])]
    expected = [s for row_scores in tuned_scores[:3] for s in row_scores]
    assert [ll for ll, _ in lm.loglikelihood(requests)] == pytest.approx(expected, abs=1e-4)
    with pipeline.model.disable_adapter():
        expected = [s for row_scores in base_scores[:3] for s in row_scores]
        assert [ll for ll, _ in lm.loglikelihood(requests)] == pytest.approx(expected, abs=1e-4)
    # a document scored whole (perplexity tasks) follows bos once; generation tasks decode as `elmtune generate`
    tok = pipeline.tokenizer
    ids = [tok.bos_id] + tok.encode(["say a b hello"])[0]
    with torch.no_grad():
        logp = pipeline.model(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)
    whole = sum(logp[i - 1, ids[i]].item() for i in range(1, len(ids)))
    rolling = Instance("loglikelihood_rolling", {}, ("say a b hello",), 0)
    assert lm.loglikelihood_rolling([rolling]) == pytest.approx([whole], abs=1e-4)
    prompts = ["say c d answer", "say e answer"]
    generated = lm.generate_until([Instance("generate_until", {}, (p, {"until": ["\n\n"], "max_gen_toks": 3,
                                                                        "do_sample": False}), i)
                                   for i, p in enumerate(prompts)])
    sampling = SamplingOptions(max_new_tokens=3, repetition_penalty=1.0)
    assert generated == [c.output for c in complete(pipeline, prompts, sampling)]


def test_wrapper_tokenizes_lm_eval_contexts_as_stock_with_llama2_tokenizer():
    """With Llama-2's tokenizer, our wrapper's ids (bos + SentencePiece, as training) equal the stock wrapper's
    (transformers' tokenizer, which adds bos) on lm-eval-style contexts — English, Chinese, few-shot blank lines —
    and differ only where transformers 5 splits runs of spaces differently."""
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install 'elmtune[lm-eval]')")
    from elmtune.benchmarks import elmtune_lm
    from elmtune.inference import Pipeline
    from elmtune.tokenizer import load_tokenizer
    from tests.helpers import shared_path, tiny_model

    tok = load_tokenizer(str(shared_path("data", "llama2-tokenizer")))
    lm = elmtune_lm(Pipeline(tiny_model(), tok, None), batch_size=2)
    contexts = ["Question: What is the capital of France?\nAnswer: Paris\n\nQuestion: 2+2?\nAnswer:",
                "以下是中国关于会计考试的单项选择题，请选出其中的正确答案。\n\n题目：1+1=\nA. 1\nB. 2\n答案：",
                "The man picked up the ball. Then he"]
    for context in contexts:
        assert lm.tok_encode(context) == tok.hf.encode(context), context
        assert lm.tok_encode(context)[0] == tok.bos_id and lm.tok_encode(context, add_special_tokens=False)[0] != 1
    assert lm.tok_encode("a  b") == [tok.bos_id] + tok.encode(["a  b"])[0] != tok.hf.encode("a  b")


@pytest.mark.slow  # ~40 s here (merge, two more lm-eval runs, lm-eval's HF loading path)
def test_eval_tasks_equals_lm_eval_stock_hf_wrapper(trained, tmp_path):
    """lm-eval's stock HF wrapper, loading our checkpoints itself (``import elmtune`` registers OpenELM with the
    Auto classes): the base directory, and the adapter merged into a standalone checkpoint, score as ``eval``
    does, one-shot (the shot drawn by lm-eval's seeded sampler)."""
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install 'elmtune[lm-eval]')")
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from elmtune.merge import merge

    base, adapter = trained
    task = write_task(tmp_path / "task")
    heldout = tmp_path / "heldout.jsonl"  # --data beside --tasks: one report with both sections
    heldout.write_text("".join(json.dumps({"prompt": f"say {w} a answer", "completion": " hello"}) + "\n"
                               for w in "bcd"))
    out = tmp_path / "eval"
    assert main(["eval", "-a", str(adapter), "--tasks", "say_hello", "--include-path", str(task), "-o", str(out),
                 "--data", str(heldout), "--max-new-tokens", "2", "--device", "cpu", "--dtype", "float32",
                 "--limit", "12", "--num-fewshot", "1"]) == 0
    report = json.loads((out / "eval.json").read_text())
    assert report["n"] == 3 and report["adapter_model"]["loss"] < report["base"]["loss"]
    assert "| answer loss |" in (out / "eval.md").read_text() and "## Benchmarks" in (out / "eval.md").read_text()
    row = report["benchmarks"]["results"]["say_hello"]
    assert row["n"] == 12
    merged = merge(str(adapter), str(tmp_path / "merged"))["output_dir"]
    manager = TaskManager(include_path=str(task), include_defaults=False)
    for directory, key in ((base, "base"), (merged, "adapter_model")):
        stock = HFLM(pretrained=str(directory), tokenizer=str(adapter), add_bos_token=True, device="cpu",
                     dtype="float32", batch_size=4)
        result = simple_evaluate(model=stock, tasks=["say_hello"], task_manager=manager, limit=12, num_fewshot=1)
        assert result["results"]["say_hello"]["acc,none"] == row[key]["acc"]
        assert result["results"]["say_hello"]["acc_stderr,none"] == pytest.approx(row[f"{key}_stderr"]["acc"])
    # the merged model scored alone (--model, no --adapter): one column, the adapter's score; the task by its path
    assert main(["eval", "-m", str(merged), "--tasks", str(task / "hello.yaml"), "-o", str(tmp_path / "alone"),
                 "--device", "cpu", "--dtype", "float32", "--limit", "12", "--num-fewshot", "1"]) == 0
    alone = json.loads((tmp_path / "alone" / "eval.json").read_text())["benchmarks"]["results"]["say_hello"]
    assert set(alone) == {"alias", "n", "model", "model_stderr"} and alone["model"] == row["adapter_model"]


def test_uncached_hub_dataset_offline_fails_in_one_line(trained, tmp_path):
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install 'elmtune[lm-eval]')")
    _, adapter = trained
    task = tmp_path / "hub"
    task.mkdir()
    (task / "arc.yaml").write_text(TASK_YAML.format(name="hub_arc", dataset_path="allenai/ai2_arc",
                                                    dataset_lines="dataset_name: ARC-Easy"))
    hf_home = tmp_path / "hf"  # an empty cache: nothing of ai2_arc can be there
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(hf_home),
           "HF_DATASETS_CACHE": str(hf_home / "datasets")}
    done = subprocess.run([sys.executable, "-m", "elmtune.cli", "eval", "-a", str(adapter), "--tasks", "hub_arc",
                           "--include-path", str(task), "-o", str(tmp_path / "out")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    [line] = [line for line in done.stderr.splitlines() if "error" in line.lower()]
    assert line.startswith("elmtune eval: error: task hub_arc: its dataset is not in the local datasets cache")
    assert "allenai/ai2_arc" in line and "HF_DATASETS_OFFLINE=1" in line and "--include-path" in line
    assert not (tmp_path / "out").exists()  # it failed before loading any model


@pytest.mark.slow  # ~60-90 s here: lm-eval indexes its ~14,000 built-in task definitions
def test_hub_task_names_offline_and_unknown_names(trained, tmp_path, capsys):
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install 'elmtune[lm-eval]')")
    _, adapter = trained
    hf_home = tmp_path / "hf"
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(hf_home),
           "HF_DATASETS_CACHE": str(hf_home / "datasets")}
    done = subprocess.run([sys.executable, "-m", "elmtune.cli", "eval", "-a", str(adapter), "--tasks", "arc_easy",
                           "-o", str(tmp_path / "out")], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 2, done.stderr
    [line] = [line for line in done.stderr.splitlines() if "error" in line.lower()]
    assert line.startswith("elmtune eval: error: task arc_easy: its dataset is not in the local datasets cache")

    task = write_task(tmp_path / "task")  # a local name found, an unknown one not: lm-eval's own are searched too
    assert main(["eval", "-a", str(adapter), "--tasks", "say_hello,no_such_task", "--include-path", str(task),
                 "-o", str(tmp_path / "out")]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert "unknown task 'no_such_task': not an lm-eval task, group or tag nor in --include-path" in line
