"""Standard benchmarks (MMLU, CMMLU, C-Eval, ARC, HellaSwag, … or a task of your own) through lm-evaluation-harness.

``elmtune eval --tasks`` scores the base model and base + adapter on lm-eval tasks with lm-eval's own task
definitions, metrics and request batching: :class:`ElmtuneLM` is lm-eval's Hugging Face wrapper (``HFLM``) handed
the model elmtune already loaded (native OpenELM, the adapter applied through PEFT; the base column runs with the
adapter disabled), on the device and in the dtype ``eval`` picked.  Two things differ from a stock ``HFLM``:

* text is tokenized as training and ``elmtune generate`` tokenize it: ``[bos]`` + the SentencePiece model's ids
  (:mod:`elmtune.tokenizer`).  transformers 5's Llama tokenizer splits runs of spaces differently, and a
  tokenizer whose config does not ask for bos would score without it, unlike anything the model was trained on;
* log-softmax is taken in fp32 even when the model runs in bf16/fp16;
* a document scored whole (``loglikelihood_rolling``: wikitext-style perplexity tasks) follows the bos prefix
  token once: its own tokens are encoded without another bos.

lm-eval is an optional extra (``pip install 'elmtune[lm-eval]'``); nothing here imports it at module level.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .inference import Pipeline

#: Requests (context + continuation rows) per forward pass.
DEFAULT_BATCH_SIZE = 16
INSTALL_HINT = "pip install 'elmtune[lm-eval]'"


class BenchmarkError(ValueError):
    """A benchmark that cannot run as asked (lm-eval missing, unknown task, data not available): one line."""


def _lm_eval():
    try:
        import lm_eval
        import lm_eval.evaluator  # noqa: F401
    except ImportError as error:
        raise BenchmarkError(f"--tasks needs lm-evaluation-harness, which is not installed ({error}): "
                             f"{INSTALL_HINT}") from None
    return lm_eval


def elmtune_lm(pipeline: Pipeline, batch_size: int = DEFAULT_BATCH_SIZE):
    """lm-eval's ``HFLM`` over ``pipeline`` (model + adapter already loaded and placed), tokenizing as elmtune does."""
    _lm_eval()
    from lm_eval.models.huggingface import HFLM

    class ElmtuneLM(HFLM):
        def __init__(self):
            self.elmtune_tokenizer = pipeline.tokenizer
            self.rolling = False
            # HFLM warns that a pre-built model skips its loading options: that is the point here
            hf_logger = logging.getLogger("lm_eval.models.huggingface")
            level = hf_logger.level
            hf_logger.setLevel(logging.ERROR)
            try:
                super().__init__(pretrained=pipeline.model, tokenizer=pipeline.tokenizer.hf, backend="causal",
                                 batch_size=batch_size, softmax_dtype=torch.float32)
            finally:
                hf_logger.setLevel(level)

        def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                       **kwargs) -> list[int]:
            tok = self.elmtune_tokenizer
            wanted = add_special_tokens if add_special_tokens is not None else not self.rolling
            bos = [tok.bos_id] if tok.bos_id is not None and wanted else []
            if bos and string.startswith(tok.hf.bos_token):  # a context that already carries bos as text
                string = string[len(tok.hf.bos_token):]
            ids = bos + tok.encode([string])[0]
            return ids[-left_truncate_len:] if left_truncate_len else ids

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            # a whole document is scored after the prefix token (bos), which must not be its first token as well
            self.rolling = True
            try:
                return super().loglikelihood_rolling(requests, disable_tqdm)
            finally:
                self.rolling = False

        def tok_batch_encode(self, strings: list[str], padding_side: str = "left", left_truncate_len: int | None = None,
                             truncation: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
            rows = [self.tok_encode(s, left_truncate_len=left_truncate_len) for s in strings]
            width = max(len(r) for r in rows)
            pad = self.elmtune_tokenizer.pad_id
            padded = [([pad] * (width - len(r)) + r) if padding_side == "left" else (r + [pad] * (width - len(r)))
                      for r in rows]
            masks = [([0] * (width - len(r)) + [1] * len(r)) if padding_side == "left"
                     else ([1] * len(r) + [0] * (width - len(r))) for r in rows]
            return torch.tensor(padded), torch.tensor(masks)

    return ElmtuneLM()


def _is_yaml(spec: str) -> bool:
    return spec.endswith((".yaml", ".yml")) and Path(spec).is_file()


def task_manager(specs: list[str], include_path: list[str] | None = None):
    """lm-eval's TaskManager for ``specs`` (task, group or tag names, or paths to task YAML files).  lm-eval's own
    14,000-odd task definitions take about a minute to index on a slow CPU, so they are indexed only when a name
    is not found in ``include_path``; an unknown name is a BenchmarkError."""
    _lm_eval()
    from lm_eval.tasks import TaskManager

    for path in include_path or []:
        if not Path(path).is_dir():
            raise BenchmarkError(f"--include-path {path}: not a directory")
    for spec in specs:
        if spec.endswith((".yaml", ".yml")) and not Path(spec).is_file():
            raise BenchmarkError(f"--tasks {spec}: no such file")
    names = [s for s in specs if not _is_yaml(s)]
    if include_path:
        manager = TaskManager(include_path=include_path, include_defaults=False)
        if all(name in manager.all_tasks for name in names):
            return manager
    manager = TaskManager(include_path=include_path or None) if names else TaskManager(include_defaults=False)
    unknown = [name for name in names if name not in manager.all_tasks]
    if unknown:
        where = " nor in --include-path" if include_path else ""
        raise BenchmarkError(f"unknown task {', '.join(map(repr, unknown))}: not an lm-eval task, group or tag{where} "
                             f"(list them with `lm-eval ls tasks`; a task of your own: --include-path DIR or a "
                             f"path to its YAML)")
    return manager


def load_tasks(specs: list[str], manager) -> dict:
    """lm-eval's task dict (``TaskManager.load``: tasks, groups, group map) for ``specs``, their data loaded (from
    the datasets cache or local files) before any model is: a dataset that is not cached and cannot be downloaded
    is one BenchmarkError line saying how to fetch it."""
    merged: dict = {"tasks": {}, "groups": {}, "group_map": {}}
    for spec in specs:
        try:
            loaded = manager.load([spec])
        except ConnectionError as error:
            raise BenchmarkError(
                f"task {spec}: its dataset is not in the local datasets cache and cannot be downloaded ({error}); "
                "fetch it once with network access (run the same command online: datasets caches it under "
                "$HF_DATASETS_CACHE, default ~/.cache/huggingface/datasets; later runs work offline, with "
                "HF_DATASETS_OFFLINE=1 too), or define the task by a local YAML + data files (--include-path)"
            ) from error
        except (OSError, KeyError, ValueError, TypeError) as error:  # a bad YAML, data file or config
            message = error.args[0] if isinstance(error, KeyError) and error.args else error
            raise BenchmarkError(f"task {spec}: {message}") from error
        for key in merged:
            merged[key].update(loaded[key])
    return merged


def prepare_tasks(specs: list[str], include_path: list[str] | None = None) -> dict:
    """:func:`load_tasks` with the :func:`task_manager` for ``specs``: everything short of a model."""
    return load_tasks(specs, task_manager(specs, include_path))


def _metrics(entry: dict) -> tuple[dict, dict]:
    """lm-eval's ``{"acc,none": v, "acc_stderr,none": s, "alias": …}`` as ({"acc": v}, {"acc": s}); a filter
    other than ``none`` stays in the name (``exact_match,strict-match``)."""
    values, stderrs = {}, {}
    for key, value in entry.items():
        if "," not in key or not isinstance(value, (int, float)):
            continue
        metric, _, filter_name = key.partition(",")
        name = lambda m: m if filter_name == "none" else f"{m},{filter_name}"  # noqa: E731
        if metric.endswith("_stderr"):
            stderrs[name(metric[:-len("_stderr")])] = value
        else:
            values[name(metric)] = value
    return values, stderrs


def _prepare(loaded: dict, num_fewshot: int | None) -> None:
    """What ``lm_eval.simple_evaluate`` does to tasks before evaluating (``evaluate`` is called directly, so that
    tasks load once for both models and no environment report is collected per run): ``num_fewshot`` overrides a
    task's own count unless the task fixes it at 0; a task without one gets 0; few-shot examples drawn with
    lm-eval's default seed."""
    from lm_eval.defaults import DEFAULT_OTHER_SEED

    for task in loaded["tasks"].values():
        if num_fewshot is not None and task.get_config("num_fewshot") != 0:
            task.set_config(key="num_fewshot", value=num_fewshot)
        elif task.get_config("num_fewshot") is None:
            task.set_config(key="num_fewshot", value=0)
        task.set_fewshot_seed(seed=DEFAULT_OTHER_SEED)


def _seed() -> None:
    """lm-eval's default seeds (as ``simple_evaluate`` sets them), before each model's run."""
    import random

    import numpy as np
    from lm_eval.defaults import DEFAULT_OTHER_SEED, DEFAULT_RANDOM_SEED

    random.seed(DEFAULT_RANDOM_SEED)
    np.random.seed(DEFAULT_OTHER_SEED)
    torch.manual_seed(DEFAULT_OTHER_SEED)


def run_benchmarks(pipeline: Pipeline, specs: list[str], include_path: list[str] | None = None,
                   num_fewshot: int | None = None, limit: int | None = None,
                   batch_size: int = DEFAULT_BATCH_SIZE, loaded: dict | None = None) -> dict:
    """Score base and base + adapter (or a model loaded without adapter, alone) on ``specs`` with lm-eval.
    ``loaded``: the task dict :func:`prepare_tasks` made already (so that missing data fails before the model
    loads).

    Returns ``{"tasks", "num_fewshot", "limit", "lm_eval_version", "results": {name: {"alias", "n", "base",
    "adapter_model", "base_stderr", "adapter_model_stderr"}}}`` (``model`` and ``model_stderr`` for a model
    alone), one entry per task and group, in lm-eval's order; each metric as ``{"acc": value}``."""
    lm_eval = _lm_eval()
    from lm_eval.evaluator import evaluate

    from .evaluate import compared

    if loaded is None:
        loaded = prepare_tasks(specs, include_path)
    _prepare(loaded, num_fewshot)
    lm = elmtune_lm(pipeline, batch_size)
    model = pipeline.model
    results: dict[str, dict] = {}
    for key, tuned in compared(pipeline):  # base and base + adapter, or a model loaded without one alone
        context = model.disable_adapter() if (not tuned and hasattr(model, "disable_adapter")) else nullcontext()
        _seed()
        with context:
            out = evaluate(lm=lm, task_dict=loaded, limit=limit, log_samples=False)
        n_samples = out.get("n-samples", {})
        for name, entry in out["results"].items():
            values, stderrs = _metrics(entry)
            row = results.setdefault(name, {"alias": str(entry.get("alias", name)).strip(" -") or name})
            if name in n_samples:
                row["n"] = n_samples[name]["effective"]
            row[key], row[f"{key}_stderr"] = values, stderrs
    return {"tasks": specs, "num_fewshot": num_fewshot, "limit": limit,
            "lm_eval_version": getattr(lm_eval, "__version__", "unknown"), "results": results}


def _fmt(value: float, stderr: float | None) -> str:
    return f"{value:.4f}" + (f" ± {stderr:.4f}" if isinstance(stderr, (int, float)) and stderr == stderr else "")


def markdown(bench: dict) -> str:
    from .evaluate import TITLES

    shots = "task default shots" if bench["num_fewshot"] is None else f"{bench['num_fewshot']}-shot"
    limit = f", first {bench['limit']} examples per task" if bench["limit"] else ""
    rows = list(bench["results"].values())
    keys = [key for key in TITLES if rows and key in rows[0]]
    lines = [f"## Benchmarks (lm-evaluation-harness {bench['lm_eval_version']}, {shots}{limit})", "",
             "| task | metric | n | " + " | ".join(TITLES[k] for k in keys) + " |", "|---" * (len(keys) + 3) + "|"]
    for row in rows:
        for metric in row[keys[0]]:
            cells = [_fmt(row[k].get(metric, float("nan")), row[f"{k}_stderr"].get(metric)) for k in keys]
            lines.append(f"| {row['alias']} | {metric} | {row.get('n', '')} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
