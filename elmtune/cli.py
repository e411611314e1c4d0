"""The ``elmtune`` command line: a thin table of command → plain function (everything is callable from Python)."""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable

from huggingface_hub.errors import StrictDataclassError

from . import __version__


class UsageError(Exception):
    """A problem with what the user asked for: printed as one line, exit code 2."""


def info(model: str) -> dict:
    """Architecture and parameter counts of a preset or checkpoint, computed on the meta device."""
    from .models.loading import build_on_meta, load_config

    config = load_config(model)
    net = build_on_meta(config)
    return {
        "model": model,
        "layers": config.num_transformer_layers,
        "model_dim": config.model_dim,
        "head_dim": config.head_dim,
        "query_heads": config.num_query_heads,
        "kv_heads": config.num_kv_heads,
        "ffn_dims": [config.ffn_dim(i) for i in range(config.num_transformer_layers)],
        "vocab_size": config.vocab_size,
        "tied_embeddings": config.share_input_output_layers,
        "parameters": sum(p.numel() for p in net.parameters()),
    }


def _info_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a preset (openelm-270m, openelm-450m, openelm-1.1b, openelm-3b) or a checkpoint "
                                 "directory in Apple's layout")


def _print_info(args: argparse.Namespace) -> int:
    for key, value in info(args.model).items():
        print(f"{key:>15}: {value:,}" if isinstance(value, int) and not isinstance(value, bool) else f"{key:>15}: {value}")
    return 0


def _options_from(args: argparse.Namespace, cls):
    from .options import resolve

    flags = {k: v for k, v in vars(args).items()
             if k not in ("command", "subcommand", "run", "debug", "config", "show", "output")}
    return resolve(cls, yaml_path=getattr(args, "config", None), flags=flags)


def _train_parser(p: argparse.ArgumentParser) -> None:
    from .options import add_arguments
    from .training.args import TrainOptions

    p.add_argument("--config", "-c", metavar="YAML", help="options from a YAML file (keys = option names); "
                                                            "flags given here override it")
    add_arguments(p, TrainOptions)


def _run_train(args: argparse.Namespace) -> int:
    import json
    import os

    from .training import TrainOptions, train

    summary = train(_options_from(args, TrainOptions))
    if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 speaks for the run
        return 0
    if "output_dir" not in summary:  # a dry run: the plan
        for key, value in summary.items():
            print(f"{key:>22}: {json.dumps(value) if isinstance(value, dict) else f'{value:,}' if isinstance(value, int) else value}")
        return 0
    if "stopped" in summary:
        print(f"stopped by {summary['stopped']}; a checkpoint was saved: continue with the same command plus "
              "--resume auto")
    what = "model" if "full" in (summary.get("method"), summary.get("tune")) else "adapter"
    print(f"{what} written to {summary['output_dir']} after {summary['global_step']} steps"
          + (f"; loss {summary['first_loss']:.4f} → {summary['last_loss']:.4f}" if "last_loss" in summary else "")
          + (f"; eval loss {summary['eval_loss']:.4f}" if "eval_loss" in summary else "")
          + (f"; eval reward accuracy {summary['eval_reward_accuracy']:.1%}" if "eval_reward_accuracy" in summary
             else ""))
    return 0


def _inspect_parser(p: argparse.ArgumentParser) -> None:
    from .options import add_arguments, bounded
    from .training.args import DataOptions

    p.add_argument("--config", "-c", metavar="YAML", help="read these options from a YAML file (e.g. a training "
                                                            "config; keys that are not data options are ignored)")
    add_arguments(p, DataOptions)
    p.add_argument("--show", type=bounded(int, 0), default=3, metavar="N", help="examples to print (default: 3)")
    p.add_argument("--output", metavar="FILE.jsonl", help="write every kept example (file, index, input_ids, "
                                                           "attention_mask, labels) to this JSONL file")


def _run_inspect(args: argparse.Namespace) -> int:
    from .data import DataSpec
    from .data.inspect import inspect_data
    from .options import resolve
    from .tokenizer import load_tokenizer
    from .training.args import DataOptions, TrainOptions

    flags = {k: v for k, v in vars(args).items() if k in DataOptions.__dataclass_fields__}
    train_only = set(TrainOptions.__dataclass_fields__) - set(DataOptions.__dataclass_fields__)
    options = resolve(DataOptions, yaml_path=args.config, flags=flags, yaml_ignore=train_only)
    if not options.data:
        raise UsageError("no --data given")
    if not options.tokenizer:
        raise UsageError("no --tokenizer given")
    spec = DataSpec.from_options(options)
    inspect_data(options.data, load_tokenizer(options.tokenizer), spec, options.on_bad_record, args.show, args.output)
    return 0


def _arguments_of(module: str, cls: str) -> Callable[[argparse.ArgumentParser], None]:
    """A parser builder adding one flag per field of the options dataclass ``module.cls``."""
    def add(p: argparse.ArgumentParser) -> None:
        from importlib import import_module

        from .options import add_arguments

        add_arguments(p, getattr(import_module(f"elmtune.{module}"), cls))
    return add


def _run_demo(args: argparse.Namespace) -> int:
    from .demo import DemoOptions, run_demo

    run_demo(_options_from(args, DemoOptions))
    return 0


def _model_arguments(p: argparse.ArgumentParser, adapter: bool = True, dtype: bool = True,
                     chat_template: bool = True) -> None:
    p.add_argument("--model", "-m", help="base model: checkpoint directory, hub id or preset (default: the base "
                                        "recorded with the adapter)")
    if adapter:
        p.add_argument("--adapter", "-a", help="an `elmtune train` output directory (or any PEFT adapter)")
    p.add_argument("--tokenizer", help="tokenizer directory or id (default: the adapter's copy, then the model's)")
    _template_arguments(p, "the adapter was", chat_template)
    _device_arguments(p, dtype)


def _template_arguments(p: argparse.ArgumentParser, trained: str, chat_template: bool = True) -> None:
    from .data.chat import TEMPLATE_NAMES

    p.add_argument("--template", help="prompt template override for single instructions (default: the one "
                                      f"{trained} trained with)")
    if chat_template:
        p.add_argument("--chat-template", help="chat template override for conversations (and for single "
                                               "instructions unless --template is given): "
                                               f"{', '.join(TEMPLATE_NAMES)}, a Jinja file or a template string "
                                               f"(default: the one {trained} trained with)")


def _device_arguments(p: argparse.ArgumentParser, dtype: bool = True) -> None:
    from .device import DEVICE_HELP, DTYPE_CHOICES, DTYPE_HELP

    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    if dtype:
        p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES, help=f"{DTYPE_HELP} (default: auto)")


def _sampling(args: argparse.Namespace):
    from .inference import SamplingOptions
    from .options import resolve

    names = SamplingOptions.__dataclass_fields__
    return resolve(SamplingOptions, flags={k: v for k, v in vars(args).items() if k in names})


def _generate_parser(p: argparse.ArgumentParser) -> None:
    from .inference import SamplingOptions
    from .options import add_arguments, bounded

    _model_arguments(p)
    p.add_argument("--prompt", "-p", action="append", help="an instruction to answer (repeatable)")
    p.add_argument("--input", default="", help="the optional input that goes with a single --prompt")
    p.add_argument("--prompts", metavar="FILE", help="instructions from a .txt file (one per line) or a .jsonl "
                                                      "file (records with the training fields, a 'prompt' key, or "
                                                      "a 'messages'/'conversations' conversation to answer)")
    p.add_argument("--fields", help="record fields for --prompts JSONL (default: the adapter's)")
    p.add_argument("--output", "-o", metavar="FILE.jsonl", help="write results here (default: print them)")
    p.add_argument("--batch-size", type=bounded(int, 1), default=16, help="prompts per batch (default: 16)")
    add_arguments(p, SamplingOptions)


def _prompt_requests(args: argparse.Namespace, metadata: dict) -> list[tuple[str, str] | list[dict]]:
    """What to generate for: (instruction, input) pairs, and conversations (messages) from --prompts JSONL."""
    from pathlib import Path

    from .data import read_records
    from .data.formats import conversation_of
    from .inference import prompt_fields

    if args.input and len(args.prompt or []) != 1:
        raise UsageError("--input goes with exactly one --prompt; for several, use a --prompts JSONL file")
    requests: list = [(text, args.input) for text in args.prompt or []]
    if args.prompts:
        path = Path(args.prompts)
        if path.suffix == ".txt":
            requests += [(line, "") for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        else:
            fields = prompt_fields(metadata, args.fields)
            for record in read_records([str(path)]):
                keys = {k for k, v in record.values.items() if v is not None}
                if keys & {"messages", "conversations"}:
                    fmt = "messages" if "messages" in keys else "sharegpt"
                    requests.append(conversation_of(record, fmt, require_assistant_end=False))
                elif "prompt" in record.values and isinstance(record.values["prompt"], str):
                    requests.append((record.values["prompt"], ""))
                else:
                    instruction, input_text, _ = fields.extract(record, with_output=False)
                    requests.append((instruction, input_text))
    if not requests:
        raise UsageError("nothing to generate: give --prompt TEXT or --prompts FILE")
    return requests


def _run_generate(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from .inference import complete, load_pipeline, read_metadata

    requests = _prompt_requests(args, read_metadata(args.adapter))  # bad prompts fail before a model is loaded
    sampling = _sampling(args)
    pipeline = load_pipeline(args.model, args.adapter, args.tokenizer, args.template, args.dtype, args.device,
                             chat_template=args.chat_template)
    prompts = [pipeline.chat_prompt(r) if isinstance(r, list) else pipeline.prompt(*r) for r in requests]
    results = complete(pipeline, prompts, sampling, args.batch_size)
    lines = [json.dumps({"index": n, **r.to_dict()}, ensure_ascii=False) for n, r in enumerate(results)]
    if args.output:
        out = Path(args.output)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
        tmp.replace(out)
        print(f"wrote {len(lines)} results to {out}")
    else:
        print("\n".join(lines))
    return 0


def _chat_parser(p: argparse.ArgumentParser) -> None:
    from .inference import SamplingOptions
    from .options import add_arguments

    _model_arguments(p)
    p.add_argument("--system", metavar="TEXT", help="a system message leading the conversation (/system in the "
                                                     "chat changes it)")
    add_arguments(p, SamplingOptions, include={"max_new_tokens", "temperature", "top_p", "top_k",
                                               "repetition_penalty", "seed"})


def _run_chat(args: argparse.Namespace) -> int:
    from .chat import ChatSession, chat_loop
    from .inference import load_pipeline

    sampling = _sampling(args)  # refused before a model is loaded
    pipeline = load_pipeline(args.model, args.adapter, args.tokenizer, args.template, args.dtype, args.device,
                             chat_template=args.chat_template)
    return chat_loop(ChatSession(pipeline, sampling, args.system))


def _shard_size(text: str) -> str:
    """An argparse type for a size such as 2GB, read as huggingface_hub reads it (a number, then KB, MB, GB or TB):
    checked here, so that a bad one fails before the merge runs rather than when its result is saved."""
    import math

    text = text.strip()
    try:
        size = float(text[:-2]) * {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}[text[-2:].upper()]
    except (KeyError, ValueError):
        raise argparse.ArgumentTypeError(f"expected a size such as 500MB or 2GB, got {text!r}") from None
    if not (math.isfinite(size) and size >= 1):
        raise argparse.ArgumentTypeError(f"must be a finite size of at least 1 byte, got {text!r}")
    return text


def _merge_parser(p: argparse.ArgumentParser) -> None:
    _model_arguments(p, adapter=False, dtype=False, chat_template=False)  # computed in fp32 on --device
    p.add_argument("adapter", help="the adapter directory to merge")
    p.add_argument("--output-dir", "-o", required=True, help="where the standalone model goes")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="weight dtype of the merged checkpoint; the merge itself is computed in fp32 "
                        "(default: float32, lossless)")
    p.add_argument("--max-shard-size", type=_shard_size, default="2GB",
                   help="shard the safetensors above this size, in KB, MB, GB or TB (default: 2GB)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output-dir")


def _run_merge(args: argparse.Namespace) -> int:
    from .merge import merge

    result = merge(args.adapter, args.output_dir, model=args.model, tokenizer=args.tokenizer, dtype=args.dtype,
                   max_shard_size=args.max_shard_size, overwrite=args.overwrite, device=args.device)
    print(f"merged model written to {result['output_dir']} ({', '.join(result['files'])})"
          + ("; the embedding was adapted, so the output head is untied (lm_head = base embedding)"
             if result["untied_head"] else ""))
    return 0


def _export_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a merged (`elmtune merge`) or base model directory")
    p.add_argument("--output", "-o", required=True, metavar="FILE.gguf", help="the GGUF file to write")
    p.add_argument("--type", default="f16", choices=("f32", "f16", "q8_0"), help="weight type (default: f16)")
    p.add_argument("--tokenizer", help="directory with tokenizer.model (default: the model directory)")
    p.add_argument("--fold-head", action="store_true", help="for a model with its own output head: use the input "
                                                            "embedding as the head (llama.cpp has no separate one) "
                                                            "and report the measured logit change")
    p.add_argument("--device", default="auto", help="where --fold-head measures the logit change (weights are "
                                                    "converted on the CPU; --type sets the file's dtype). "
                                                    "cuda, cuda:N, mps or cpu (default: auto)")


def _run_export(args: argparse.Namespace) -> int:
    from .export_gguf import export_gguf

    result = export_gguf(args.model, args.output, args.type, args.tokenizer, args.fold_head, args.device)
    print(f"wrote {result['output']} ({result['type']}, {result['tensors']} tensors, {result['bytes']:,} bytes)")
    if "max_logit_change_from_fold" in result:
        print(f"folding the head changed logits by up to {result['max_logit_change_from_fold']:.4f}")
    return 0


def _export_mlx_parser(p: argparse.ArgumentParser) -> None:
    from .options import bounded

    p.add_argument("source", help="an adapter directory (`elmtune train` output), or a merged, fully fine-tuned or "
                                  "base model (directory or hub id)")
    p.add_argument("--output-dir", "-o", required=True, help="where the mlx-lm files go")
    p.add_argument("--adapter-only", action="store_true",
                   help="write an mlx-lm adapter (adapters.safetensors + adapter_config.json) for "
                        "`mlx_lm.generate --model BASE --adapter-path DIR` instead of a fused model")
    p.add_argument("--base-output", metavar="DIR", help="with --adapter-only: also write the base model here, with "
                                                        "the adapter's tokenizer and prompt templates, as the BASE "
                                                        "for mlx-lm")
    p.add_argument("--model", "-m", help="the adapter's base model (default: the one recorded with the adapter)")
    p.add_argument("--tokenizer", help="tokenizer directory or id (default: the adapter's copy, then the model's)")
    _template_arguments(p, "the adapter was")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="weight dtype of a model written (the adapter is folded in fp32 first; default: float32)")
    p.add_argument("--q-bits", type=bounded(int, 4, 8), choices=(4, 8),
                   help="quantise the model written with mlx-lm's own quantisation (needs mlx and mlx-lm installed)")
    p.add_argument("--q-group-size", type=bounded(int, 32, 128), choices=(32, 64, 128), default=64,
                   help="weights sharing one scale and bias in the quantisation (default: 64)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--device", default="auto", help="where the adapter is folded in: cuda, cuda:N, mps or cpu "
                                                    "(default: auto)")


def _run_export_mlx(args: argparse.Namespace) -> int:
    from .export_mlx import INSTALL_HINT, export_mlx, run_commands

    result = export_mlx(args.source, args.output_dir, adapter_only=args.adapter_only, base_output=args.base_output,
                        model=args.model, tokenizer=args.tokenizer, template=args.template,
                        chat_template=args.chat_template, dtype=args.dtype, q_bits=args.q_bits,
                        q_group_size=args.q_group_size, overwrite=args.overwrite, device=args.device)
    what = {"adapter": "mlx-lm adapter", "fused": "fused mlx-lm model", "model": "mlx-lm model"}[result["kind"]]
    print(f"{what} written to {result['output_dir']}"
          + (f" (base model in {result['base_output']})" if result.get("base_output") else "")
          + ("; the embedding was adapted, so the output head is untied" if result.get("untied_head") else "")
          + (f"; quantised to {result['quantization']['bits']} bits" if "quantization" in result else ""))
    if not result["mlx_installed"]:
        print(f"mlx is not installed here; on a Mac: {INSTALL_HINT.split('  ')[0]}")
    if result["kind"] == "adapter" and not result.get("base_output"):
        print(f"mlx-lm loads the tokenizer and chat template from --model: {result['base_model']} must hold them "
              "(Apple's hub repos hold no tokenizer); --base-output DIR writes such a base")
    print("run it with:")
    for command in run_commands(result):
        print(f"  {command}")
    return 0


def _eval_parser(p: argparse.ArgumentParser) -> None:
    from .benchmarks import DEFAULT_BATCH_SIZE, INSTALL_HINT
    from .options import bounded

    _model_arguments(p)
    p.add_argument("--data", action="append", help="held-out records (same formats as train; repeatable)")
    p.add_argument("--fields", help="record fields (default: the adapter's)")
    p.add_argument("--output-dir", "-o", default="eval", help="where eval.json and eval.md go (default: eval)")
    p.add_argument("--max-new-tokens", type=bounded(int, 1), default=128,
                   help="generation length for the metrics (default: 128)")
    p.add_argument("--limit", type=bounded(int, 1), metavar="N",
                   help="evaluate only the first N records of --data and the first N examples of each task")
    bench = p.add_argument_group(
        "benchmarks", "Standard benchmarks through lm-evaluation-harness (" + INSTALL_HINT + "), base and base + "
        "adapter side by side (or --model alone). --data, --tasks or both: with both, one report holds both "
        "sections and the model is loaded once; with --tasks alone, only the benchmarks. A hub task's dataset is "
        "downloaded on its first run and read from the datasets cache afterwards (offline too); a task of your "
        "own (YAML + local data files) never needs the network.")
    bench.add_argument("--tasks", type=lambda text: [t.strip() for t in text.split(",") if t.strip()],
                       metavar="NAME[,NAME...]", help="lm-eval tasks, groups or tags (mmlu, cmmlu, ceval-valid, "
                                                      "arc_easy, hellaswag, …) or paths to task YAML files")
    bench.add_argument("--include-path", action="append", metavar="DIR",
                       help="a directory of task YAML files of your own (repeatable)")
    bench.add_argument("--num-fewshot", type=bounded(int, 0), metavar="K",
                       help="examples in each prompt (default: each task's own, 0 when it sets none)")
    bench.add_argument("--batch-size", type=bounded(int, 1), default=DEFAULT_BATCH_SIZE,
                       help=f"benchmark requests per forward pass (default: {DEFAULT_BATCH_SIZE})")


def _run_eval(args: argparse.Namespace) -> int:
    from .evaluate import markdown, run_eval

    if not args.adapter and not args.model:
        raise UsageError("give --adapter (the base model against base + adapter) or --model alone (a merged or "
                         "fully fine-tuned model, or any base, scored by itself)")
    if not args.data and not args.tasks:
        raise UsageError("nothing to evaluate: give held-out records (--data), benchmark tasks (--tasks), or both")
    report = run_eval(args.data, args.adapter, args.output_dir, args.model, args.tokenizer, args.template,
                      args.fields, args.max_new_tokens, args.limit, dtype=args.dtype, device=args.device,
                      chat_template=args.chat_template, tasks=args.tasks, include_path=args.include_path,
                      num_fewshot=args.num_fewshot, batch_size=args.batch_size)
    print(markdown(report))
    print(f"written to {args.output_dir}/eval.json and eval.md")
    return 0


def _serve_parser(p: argparse.ArgumentParser) -> None:
    from .options import bounded

    p.add_argument("--model", "-m", help="base model: checkpoint directory, hub id or preset (default: the base "
                                        "recorded with the first adapter)")
    p.add_argument("--adapter", "-a", action="append", default=[], metavar="NAME=PATH",
                   help="serve this adapter under NAME (repeatable); requests pick it with \"model\": NAME")
    p.add_argument("--tokenizer", help="tokenizer directory or id (default: the adapter's copy, then the model's)")
    _template_arguments(p, "each adapter was")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    # 0 ("any free port") is refused: the address printed at start-up would be wrong.
    p.add_argument("--port", type=bounded(int, 1, 65535), default=8000, help="port, 1-65535 (default: 8000)")
    p.add_argument("--api-key", help="require `Authorization: Bearer KEY` on every API route "
                                     "(default: $ELMTUNE_API_KEY if set, else no key)")
    p.add_argument("--max-batch-size", type=bounded(int, 1), default=16, help="requests decoded together (default: 16)")
    p.add_argument("--max-tokens-limit", type=bounded(int, 1), default=1024,
                   help="largest max_tokens a request may ask (default: 1024)")
    p.add_argument("--default-max-tokens", type=bounded(int, 1), default=256,
                   help="max_tokens when a request gives none (default: 256)")
    p.add_argument("--max-prompt-tokens", type=bounded(int, 1),
                   help="longest prompt accepted (default: the model's context)")
    _device_arguments(p)


def _run_serve(args: argparse.Namespace) -> int:
    import os

    from .serve import build_state, serve

    adapters = {}
    for item in args.adapter:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise UsageError(f"--adapter {item!r}: expected NAME=PATH")
        if name in adapters:
            raise UsageError(f"--adapter: the name {name!r} is given twice")
        adapters[name] = path
    limits = {"max_tokens_limit": args.max_tokens_limit, "default_max_tokens": args.default_max_tokens}
    if args.max_prompt_tokens:
        limits["max_prompt_tokens"] = args.max_prompt_tokens
    state = build_state(args.model, adapters, args.tokenizer, args.template, chat_template=args.chat_template,
                        api_key=args.api_key or os.environ.get("ELMTUNE_API_KEY"),
                        max_batch_size=args.max_batch_size, device=args.device, dtype=args.dtype, **limits)
    print(f"serving {', '.join(state.model_names)} on http://{args.host}:{args.port}/ "
          f"(chat page at /, OpenAI API at /v1{', API key required' if state.api_key else ''})")
    serve(state, args.host, args.port)
    return 0


def _run_bench_train(args: argparse.Namespace) -> int:
    from .bench import BenchTrainOptions, bench_train

    bench_train(_options_from(args, BenchTrainOptions))
    return 0


def _run_bench_generate(args: argparse.Namespace) -> int:
    from .bench import BenchGenerateOptions, bench_generate

    bench_generate(_options_from(args, BenchGenerateOptions))
    return 0


# command → (one-line help, add arguments, run). New commands register here and nowhere else.
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {
    "demo": ("the whole pipeline offline in minutes: generated task, tiny OpenELM, LoRA training, accuracy "
             "before/after", _arguments_of("demo", "DemoOptions"), _run_demo),
    "train": ("fine-tune an OpenELM model on instruction data (LoRA, DoRA or full)", _train_parser, _run_train),
    "data inspect": ("show what training will see: rendered examples, supervised tokens, statistics",
                     _inspect_parser, _run_inspect),
    "generate": ("answer one prompt or a file of prompts with a base model (+ adapter), as JSONL",
                 _generate_parser, _run_generate),
    "chat": ("interactive terminal chat with streamed replies", _chat_parser, _run_chat),
    "eval": ("base vs base + adapter on held-out data (answer loss, perplexity, exact match, ROUGE-L) and/or "
             "standard benchmarks through lm-evaluation-harness (--tasks)",
             _eval_parser, _run_eval),
    "serve": ("HTTP server: the tutorial's POST /, an OpenAI-compatible /v1 API, several adapters, a chat page",
              _serve_parser, _run_serve),
    "merge": ("fold an adapter into its base: a standalone checkpoint in Apple's layout", _merge_parser, _run_merge),
    "export gguf": ("write a merged or base model as GGUF for llama.cpp / Ollama", _export_parser, _run_export),
    "export mlx": ("write an adapter or a model for mlx-lm on Apple silicon (adapter, fused or quantised)",
                   _export_mlx_parser, _run_export_mlx),
    "bench train": ("measure training speed, memory and MFU: the tutorial's path vs elmtune's, same data",
                    _arguments_of("bench", "BenchTrainOptions"), _run_bench_train),
    "bench generate": ("measure decoding tokens/s with the KV cache, batch 1 and 8",
                       _arguments_of("bench", "BenchGenerateOptions"), _run_bench_generate),
    "info": ("show an OpenELM architecture and its parameter count (no weights loaded)", _info_parser, _print_info),
}


class _Parser(argparse.ArgumentParser):
    """Argument errors in one line, exit code 2 (the usage is one `--help` away)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="elmtune",
        description="Fine-tune Apple's OpenELM models with LoRA, and run what comes out of it.",
    )
    parser.add_argument("--version", action="version", version=f"elmtune {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    groups: dict[str, argparse._SubParsersAction] = {}
    for name, (help_text, add_arguments, run) in COMMANDS.items():
        group, _, leaf = name.rpartition(" ")
        if group and group not in groups:
            groups[group] = sub.add_parser(group, help=f"{group} commands").add_subparsers(
                dest="subcommand", metavar="SUBCOMMAND", required=True, parser_class=_Parser)
        command = (groups[group] if group else sub).add_parser(leaf, help=help_text, description=help_text)
        add_arguments(command)
        command.set_defaults(run=run, command=name)
    return parser


def main(argv: list[str] | None = None) -> int:
    warnings.filterwarnings("ignore", category=FutureWarning)  # library deprecation notes are not for users
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.run(args)
    except (UsageError, ValueError, OSError, StrictDataclassError) as error:
        if args.debug:
            raise
        print(f"elmtune {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
