"""``elmtune export mlx``: an adapter or a model → files that mlx-lm runs on Apple silicon.

Two outputs:

* ``--adapter-only``: an mlx-lm adapter directory (``adapters.safetensors`` + ``adapter_config.json``) for
  ``mlx_lm.generate --model BASE --adapter-path DIR``.  mlx-lm's ``LoRALinear`` computes
  ``x @ W.T + scale * (x @ lora_a) @ lora_b`` with ``lora_a [in, r]`` and ``lora_b [r, out]``, so PEFT's
  ``lora_A [r, in]`` / ``lora_B [out, r]`` are written transposed and ``scale`` is PEFT's scaling
  (``lora_alpha / r``, or ``/ sqrt(r)`` under rsLoRA); ``keys`` name the modules inside a layer
  (``attn.qkv_proj`` …) or from the model's root (``transformer.token_embeddings``, ``lm_head``).  DoRA
  (``fine_tune_type: dora``) carries PEFT's magnitude vector as ``m``: mlx-lm's ``DoRALinear`` computes the
  same ``m / ||W + scale·BA||_row`` rescaling.
* otherwise a standalone mlx-lm model directory: the adapter folded in (:func:`elmtune.merge.merge_adapter`),
  weights in Apple's OpenELM layout (which is mlx-lm's ``openelm`` layout) as plain safetensors, Apple's
  ``config.json`` and the tokenizer; with ``q_bits``, quantised by mlx-lm itself (needs ``mlx``).

The tied head: Apple's OpenELM uses ``token_embeddings`` as its output head too, and under PEFT the head keeps
the *base* embedding when the embedding is LoRA-adapted.  mlx-lm's ``LoRAEmbedding`` applies its delta to the
head as well (``as_linear``), and no choice of ``lora_a``/``lora_b`` can change the lookup but not the head, so
such an adapter on a tied base is refused as ``--adapter-only``; the fused export unties the head
(``share_input_output_layers: false`` + ``lm_head.weight`` = the base embedding), which mlx-lm's OpenELM runs.

Prompts: mlx-lm renders every prompt with the model directory's chat template (``tokenizer_config.json``),
tokenized as one text.  :func:`mlx_chat_template` writes the template that gives the prompts elmtune gives
(:class:`elmtune.inference.Prompter`): for an adapter trained on instructions, a conversation of one user
message (after any system messages) is the prompt template around the messages' texts joined by newlines;
anything else goes through the adapter's chat template (``openelm`` as :data:`OPENELM_FOR_WHOLE_TEXT`, whose
whole-text tokenization gives elmtune's per-turn ids; other templates as they are).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

INSTALL_HINT = 'pip install "elmtune[mlx]"  (on Linux: pip install "mlx[cpu]" mlx-lm)'
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
Q_BITS = (4, 8)
_SHARD_BYTES = 5 * 10**9  # mlx-lm's own shard size
_PEFT_PREFIX = "base_model.model."


class ExportError(ValueError):
    pass


def mlx_available() -> bool:
    """Whether mlx and mlx-lm import here (Apple silicon, or Linux with ``mlx[cpu]``)."""
    try:
        import mlx.core  # noqa: F401
        import mlx_lm  # noqa: F401
    except Exception:  # ImportError, or a wheel without a backend for this machine
        return False
    return True


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def check_supported(config) -> None:
    """What mlx-lm's ``openelm`` can run: the gated SiLU feed-forward and RMSNorm."""
    problems = []
    if not config.ffn_with_glu:
        problems.append("ffn_with_glu is false (mlx-lm's openelm always uses the gated FFN)")
    if config.activation_fn_name not in ("swish", "silu"):
        problems.append(f"activation {config.activation_fn_name!r} (mlx-lm's openelm uses SiLU)")
    if getattr(config, "normalization_layer_name", "rms_norm") != "rms_norm":
        problems.append(f"normalization {config.normalization_layer_name!r} (mlx-lm's openelm uses RMSNorm)")
    if problems:
        raise ExportError("mlx-lm cannot run this model: " + "; ".join(problems))


# ----------------------------------------------------------------------------------------------- prompts


def _jinja_string(text: str) -> str:
    """``text`` as a Jinja string literal (Jinja reads Python-style escapes)."""
    return json.dumps(text, ensure_ascii=False)


#: elmtune's ``openelm`` chat template for a tokenizer that sees the rendered text whole.  elmtune tokenizes each
#: turn on its own, so a turn that follows text (a system turn's newline, a user turn's ``<sep>``) starts with
#: SentencePiece's word start; tokenized whole, the same text would not.  A space before such a turn gives the
#: same ids (after bos or eos, legacy tokenization already starts a word).
OPENELM_FOR_WHOLE_TEXT = (
    "{{- bos_token if bos_token else '' -}}\n"
    "{%- set state = namespace(after_text=false) -%}\n"
    "{%- for message in messages -%}\n"
    "    {%- set lead = ' ' if state.after_text else '' -%}\n"
    "    {%- if message['role'] == 'system' -%}\n"
    "        {{- lead + message['content'] + '\\n' -}}{%- set state.after_text = true -%}\n"
    "    {%- elif message['role'] == 'user' -%}\n"
    "        {{- lead + message['content'] + '<sep>' -}}{%- set state.after_text = true -%}\n"
    "    {%- elif message['role'] == 'assistant' -%}\n"
    "        {%- generation -%}{{- lead + message['content'] + (eos_token if eos_token else '') -}}"
    "{%- endgeneration -%}{%- set state.after_text = not eos_token -%}\n"
    "    {%- else -%}\n"
    "        {{- raise_exception('the openelm template knows the roles system, user and assistant, not '"
    " + message['role']) -}}\n"
    "    {%- endif -%}\n"
    "{%- endfor -%}\n"
)


def mlx_chat_template(prompter) -> str:
    """The chat template under which mlx-lm renders the prompts ``prompter`` renders (see the module doc).

    Expressible: one user message (with any system messages before it) → the prompt template, exactly; several
    turns → the adapter's chat template.  Not expressible: a separate ``input`` field (mlx-lm has one user
    message: ``instruction + input`` is written as that message, which is the same prompt for ``openelm-sep``
    but the no-input form for ``alpaca``)."""
    from .data.chat import OPENELM_TEMPLATE

    chat = prompter.chat_template.source
    if chat == OPENELM_TEMPLATE:
        chat = OPENELM_FOR_WHOLE_TEXT
    if prompter.instructions_as_chat:
        return chat
    pieces = prompter.template.prompt("\0", "").split("\0")  # the literal text around each {instruction}
    body = "{{- bos_token if bos_token else '' -}}{%- set text = messages | map(attribute='content') | join('\\n') -%}"
    for n, piece in enumerate(pieces):
        if n:
            body += "{{- text -}}"
        if piece:
            body += "{{- " + _jinja_string(piece) + " -}}"
    return ("{%- if messages and messages[-1]['role'] == 'user' and "
            "messages[:-1] | rejectattr('role', 'equalto', 'system') | list | length == 0 %}"
            + body + "{%- else %}" + chat + "{% endif %}")


def write_tokenizer(tokenizer, prompter, directory: Path) -> None:
    """The tokenizer's files, with ``chat_template`` (:func:`mlx_chat_template`) in ``tokenizer_config.json``.

    A SentencePiece tokenizer without a ``legacy`` setting gets ``legacy: true``: elmtune encodes with
    SentencePiece itself, and transformers' Llama tokenizer only matches it after the ``<s>`` a template
    writes when legacy (otherwise it drops the word start of the first word)."""
    tokenizer.save(directory)
    path = directory / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    config["chat_template"] = mlx_chat_template(prompter)
    if (directory / "tokenizer.model").is_file() and "legacy" not in config:
        config["legacy"] = True
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------------------------- adapters


def _peft_scale(config: dict) -> float:
    r, alpha = config["r"], config["lora_alpha"]
    return alpha / r**0.5 if config.get("use_rslora") else alpha / r


def mlx_adapter(adapter_dir: Path, base_config) -> tuple[dict, dict[str, torch.Tensor]]:
    """(mlx-lm ``adapter_config.json``, ``adapters.safetensors`` tensors) for a PEFT LoRA/DoRA adapter on
    ``base_config``'s model; refuses what mlx-lm's adapter format cannot express."""
    from safetensors.torch import load_file

    config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    where = f"{adapter_dir}/adapter_config.json"
    if config.get("peft_type") != "LORA":
        raise ExportError(f"{where}: peft_type {config.get('peft_type')!r}; mlx-lm adapters are LoRA or DoRA")
    for key, what in (("rank_pattern", "per-module ranks"), ("alpha_pattern", "per-module alphas"),
                      ("modules_to_save", "fully trained modules"), ("trainable_token_indices", "trained tokens"),
                      ("layer_replication", "replicated layers")):
        if config.get(key):
            raise ExportError(f"{where}: {key} ({what}) has no mlx-lm adapter equivalent; export without "
                              "--adapter-only (a fused model)")
    if config.get("lora_bias") or config.get("bias", "none") != "none":
        raise ExportError(f"{where}: trained biases have no mlx-lm adapter equivalent; export without --adapter-only")
    files = [adapter_dir / "adapter_model.safetensors"]
    if not files[0].is_file():
        raise ExportError(f"{adapter_dir}: no adapter_model.safetensors")
    weights = load_file(str(files[0]))
    dora = bool(config.get("use_dora"))
    rank, scale = int(config["r"]), _peft_scale(config)
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in weights.items():
        if not name.startswith(_PEFT_PREFIX):
            raise ExportError(f"{files[0]}: unexpected tensor {name!r}")
        name = name[len(_PEFT_PREFIX):]
        for suffix, part in ((".lora_A.weight", "A"), (".lora_B.weight", "B"), (".lora_embedding_A", "eA"),
                             (".lora_embedding_B", "eB"), (".lora_magnitude_vector", "m"),
                             (".lora_magnitude_vector.weight", "m")):
            if name.endswith(suffix):
                modules.setdefault(name[: -len(suffix)], {})[part] = tensor
                break
        else:
            raise ExportError(f"{files[0]}: tensor {name!r} has no mlx-lm adapter equivalent")

    tensors: dict[str, torch.Tensor] = {}
    layer_keys, root_keys, layers = set(), set(), set()
    for module, parts in sorted(modules.items()):
        if module == "transformer.token_embeddings" and base_config.share_input_output_layers:
            raise ExportError(
                "this adapter adapts token_embeddings, and the base model ties its output head to them: under PEFT "
                "the head keeps the base embedding, which an mlx-lm adapter cannot express (its LoRAEmbedding "
                "adapts the head too). Export without --adapter-only: the fused model unties the head")
        embedding = "eA" in parts
        a, b = (parts.get("eA"), parts.get("eB")) if embedding else (parts.get("A"), parts.get("B"))
        if a is None or b is None:
            raise ExportError(f"{files[0]}: {module} lacks its lora_A or lora_B tensor")
        if a.shape[0] != rank or b.shape[1] != rank:
            raise ExportError(f"{files[0]}: {module} has rank {a.shape[0]}, the config says r={rank}")
        if dora and embedding:
            raise ExportError(f"{where}: DoRA on an embedding has no exact mlx-lm equivalent; export without "
                              "--adapter-only")
        tensors[f"{module}.lora_a"] = a.T.contiguous()  # [in, r]  (embedding: [vocab, r])
        tensors[f"{module}.lora_b"] = b.T.contiguous()  # [r, out] (embedding: [r, dim])
        if dora:
            if "m" not in parts:
                raise ExportError(f"{files[0]}: DoRA adapter without a magnitude vector for {module}")
            tensors[f"{module}.m"] = parts["m"].reshape(-1).contiguous()
        if module.startswith("transformer.layers."):
            index, _, inner = module[len("transformer.layers."):].partition(".")
            layers.add(int(index))
            layer_keys.add(inner)
        else:
            root_keys.add(module)
    if not tensors:
        raise ExportError(f"{files[0]}: no LoRA tensors")
    # mlx-lm adds LoRA layers for every key to the last num_layers layers; where PEFT left a module alone, the one
    # mlx-lm adds keeps its initial lora_b = 0: no change, as under PEFT
    num_layers = base_config.num_transformer_layers - min(layers) if layers else 0
    mlx_config = {
        "fine_tune_type": "dora" if dora else "lora",
        "num_layers": num_layers,
        "lora_parameters": {"rank": rank, "scale": scale, "dropout": float(config.get("lora_dropout") or 0.0),
                            "keys": sorted(layer_keys) + sorted(root_keys)},
    }
    return mlx_config, {k: v.to(torch.float32) for k, v in sorted(tensors.items())}


# ----------------------------------------------------------------------------------------------- models


def write_weights(state_dict: dict[str, torch.Tensor], directory: Path, dtype: torch.dtype,
                  shard_bytes: int = _SHARD_BYTES) -> list[str]:
    """Plain safetensors (``model.safetensors``, or ``model-0000i-of-0000n`` shards + an index), as mlx-lm
    writes them; returns the file names."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in sorted(state_dict.items())}
    shards: list[dict] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for name, shard in zip(names, shards):
        save_file(shard, str(directory / name), metadata={"format": "mlx"})
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                 "weight_map": {k: n for n, shard in zip(names, shards) for k in shard}}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return names


def _write_model(model, tokenizer, prompter, metadata: dict, directory: Path, dtype: str) -> None:
    from .inference import METADATA_FILE
    from .merge import apple_config

    check_supported(model.config)
    write_weights(model.state_dict(), directory, DTYPES[dtype])
    config = apple_config(model.config)
    config["torch_dtype"] = dtype
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    write_tokenizer(tokenizer, prompter, directory)
    if metadata:
        (directory / METADATA_FILE).write_text(json.dumps(metadata, indent=2, ensure_ascii=False) + "\n",
                                               encoding="utf-8")


def quantize(directory: Path, bits: int, group_size: int) -> dict:
    """Quantise the model in ``directory`` in place with mlx-lm's own quantisation (affine, ``bits``)."""
    from mlx_lm.utils import load_model, quantize_model, save_config, save_model

    model, config = load_model(directory)
    model, config = quantize_model(model, config, group_size, bits)
    for old in directory.glob("model*.safetensors*"):
        old.unlink()
    save_model(directory, model)
    save_config(config, directory / "config.json")
    return config["quantization"]


def _check_output(directory: Path, overwrite: bool, flag: str, *inputs: str | None) -> None:
    """Refuse to write over anything but an empty or (with ``overwrite``) replaceable directory, never one of the
    export's local ``inputs`` (the source, the base model, the tokenizer) or a directory holding it."""
    for given in filter(None, inputs):
        if Path(given).exists() and Path(given).resolve().is_relative_to(directory.resolve()):
            raise ExportError(f"{flag} {directory} would replace {given}, which this export reads; choose another "
                              "directory")
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())) and not overwrite:
        raise ExportError(f"{flag} {directory} is not empty; pass --overwrite to replace it")


def _fresh(directory: Path) -> Path:
    tmp = directory.with_name(directory.name + ".tmp-mlx")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _finish(tmp: Path, directory: Path) -> None:
    if directory.exists():
        shutil.rmtree(directory) if directory.is_dir() else directory.unlink()
    tmp.rename(directory)  # the finished directory appears at once, never half-written


def export_mlx(source: str, output_dir: str, *, adapter_only: bool = False, base_output: str | None = None,
               model: str | None = None, tokenizer: str | None = None, template: str | None = None,
               chat_template: str | None = None, dtype: str = "float32", q_bits: int | None = None,
               q_group_size: int = 64, overwrite: bool = False, device: str = "auto") -> dict:
    """Write ``source`` (an adapter directory, or a model: directory or hub id) for mlx-lm in ``output_dir``;
    returns a summary (what was written, and the commands that run it: :func:`run_commands`)."""
    from .inference import Prompter, load_pipeline, read_metadata
    from .merge import merge_adapter
    from .models.loading import load_config, load_model
    from .tokenizer import load_tokenizer

    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    if q_bits is not None and q_bits not in Q_BITS:
        raise ExportError(f"--q-bits {q_bits}: mlx-lm quantises to {' or '.join(map(str, Q_BITS))} bits here")
    if q_group_size not in (32, 64, 128):
        raise ExportError(f"--q-group-size {q_group_size}: choose 32, 64 or 128")
    adapter = is_adapter_dir(source)
    out = Path(output_dir)
    summary: dict = {"source": source, "output_dir": str(out), "mlx_installed": mlx_available()}

    if q_bits is not None and not summary["mlx_installed"]:
        raise ExportError(f"--q-bits quantises with mlx-lm, which is not installed here: {INSTALL_HINT}")
    if adapter_only:
        if not adapter:
            raise ExportError(f"--adapter-only: {source} holds no adapter_config.json (an adapter directory is needed)")
        if q_bits is not None and not base_output:
            raise ExportError("--q-bits quantises a model, and an adapter is kept as it is: with --adapter-only it "
                              "goes with --base-output (the base is quantised; mlx-lm runs LoRA on it)")
        metadata = read_metadata(source)
        base = model or metadata.get("base_model")
        if not base:
            raise ExportError(f"{source}: no base model recorded in elmtune.json; pass --model")
        base_config = load_config(base)
        check_supported(base_config)
        mlx_config, tensors = mlx_adapter(Path(source), base_config)
        tok = load_tokenizer(tokenizer or (source if (Path(source) / "tokenizer_config.json").is_file()
                                           or (Path(source) / "tokenizer.model").is_file() else base))
        prompter = Prompter.for_adapter(metadata, tok, template, chat_template)
        if base_output and Path(base_output).resolve() == out.resolve():
            raise ExportError("--base-output must differ from --output-dir")
        _check_output(out, overwrite, "--output-dir", source, base, tokenizer)
        if base_output:
            _check_output(Path(base_output), overwrite, "--base-output", source, base, tokenizer)
        tmp = _fresh(out)
        base_tmp = _fresh(Path(base_output)) if base_output else None
        try:
            from safetensors.torch import save_file

            save_file(tensors, str(tmp / "adapters.safetensors"), metadata={"format": "mlx"})
            (tmp / "adapter_config.json").write_text(json.dumps({**mlx_config, "model": str(base_output or base)},
                                                                indent=2) + "\n", encoding="utf-8")
            (tmp / "chat_template.jinja").write_text(mlx_chat_template(prompter), encoding="utf-8")
            if base_tmp is not None:
                net = load_model(base, dtype=torch.float32)
                _write_model(net, tok, prompter, {}, base_tmp, dtype)
                if q_bits:
                    summary["quantization"] = quantize(base_tmp, q_bits, q_group_size)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            if base_tmp is not None:
                shutil.rmtree(base_tmp, ignore_errors=True)
            raise
        _finish(tmp, out)
        if base_tmp is not None:
            _finish(base_tmp, Path(base_output))
        summary.update(kind="adapter", base_model=str(base_output or base), base_output=base_output,
                       adapter_config=mlx_config, tensors=len(tensors))
        return summary

    if base_output:
        raise ExportError("--base-output goes with --adapter-only (a fused export already holds the base)")
    if model and not adapter:
        raise ExportError("--model goes with an adapter SOURCE (the base it was trained on)")
    _check_output(out, overwrite, "--output-dir", source, model, tokenizer)
    pipeline = load_pipeline(model=model if adapter else source, adapter=source if adapter else None,
                             tokenizer=tokenizer, template=template, dtype=torch.float32, device=device,
                             chat_template=chat_template)
    untied = False
    if adapter:
        net, untied = merge_adapter(pipeline.model)
    else:
        net = pipeline.model
    net = net.to("cpu")
    tmp = _fresh(out)
    try:
        metadata = {**pipeline.metadata, "exported_from": str(source)} if pipeline.metadata else {}
        _write_model(net, pipeline.tokenizer, pipeline.prompter, metadata, tmp, dtype)
        if q_bits:
            summary["quantization"] = quantize(tmp, q_bits, q_group_size)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _finish(tmp, out)
    summary.update(kind="fused" if adapter else "model", untied_head=untied, dtype=dtype,
                   files=sorted(p.name for p in out.iterdir()))
    return summary


def run_commands(summary: dict) -> list[str]:
    """The mlx-lm commands that run an export (printed by the CLI, shown in the README)."""
    out = summary["output_dir"]
    if summary["kind"] == "adapter":
        base = summary["base_model"]
        model_flags = f"--model {base} --adapter-path {out}"
    else:
        model_flags = f"--model {out}"
    return [f'mlx_lm.generate {model_flags} --prompt "Hello" --temp 0',
            f"mlx_lm.server {model_flags} --port 8080"]
