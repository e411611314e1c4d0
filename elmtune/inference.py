"""Loading a base model (+ adapter) for inference, and batched generation with the training templates.

The adapter directory written by ``elmtune train`` carries ``elmtune.json`` (base model, prompt template,
fields, the record formats and the chat template's Jinja source) and its tokenizer, so inference renders
prompts exactly as training did unless told otherwise (:class:`Prompter`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import GenerationConfig, LogitsProcessorList, RepetitionPenaltyLogitsProcessor

from .data import ChatTemplate, DataError, Fields, RenderedPrompt, Template, chat_template_for_adapter, render_prompt
from .data.formats import normalize_messages
from .options import SEED_MAX, opt
from .tokenizer import Tokenizer, load_tokenizer

log = logging.getLogger("elmtune")

METADATA_FILE = "elmtune.json"


class InferenceError(ValueError):
    """A model/adapter/tokenizer combination that cannot be used; the message says why."""


@dataclass
class SamplingOptions:
    max_new_tokens: int = opt(256, "most tokens to generate per prompt", minimum=1)
    temperature: float = opt(0.0, "sampling temperature; 0 = greedy", minimum=0)
    top_p: float = opt(1.0, "nucleus sampling: keep the smallest set of tokens with this probability mass",
                       above=0, maximum=1)
    top_k: int = opt(0, "sample only from the k most likely tokens (0: no limit)", minimum=0)
    repetition_penalty: float = opt(1.2, "penalise tokens already in the prompt or output (1.0: off; Apple "
                                          "recommends 1.2 for OpenELM)", above=0)
    seed: int | None = opt(None, "seed for sampling (reproducible outputs)", minimum=0, maximum=SEED_MAX)
    stop: list[str] = opt([], "stop when the output contains this string (repeatable); it is not returned")


@dataclass
class Prompter:
    """How one adapter's prompts are rendered: token ids exactly as training put them before an answer.

    ``template`` is the alpaca prompt template (``--template``, else the adapter's, else ``openelm-sep``);
    ``chat_template`` renders conversations (``--chat-template``, else the one saved with the adapter, else the
    tokenizer's default: its own ``chat_template``, else ``openelm``).  A single instruction (``generate
    --prompt``, the tutorial's ``POST /``, an alpaca record in ``eval``) is rendered with the prompt template —
    the tutorial's path, token for token — unless ``instructions_as_chat``: then it is a one-turn conversation
    (``instruction + input`` as the user's content) under the chat template.  That is so for an adapter trained
    on no alpaca records (conversations, say) or when ``--chat-template`` is given without ``--template``; under
    ``openelm`` both give the same ids."""

    tokenizer: Tokenizer
    template: Template
    chat_template: ChatTemplate
    instructions_as_chat: bool = False

    @classmethod
    def for_adapter(cls, metadata: dict, tokenizer: Tokenizer, template: "str | Template | None" = None,
                    chat_template: str | None = None) -> "Prompter":
        """From an adapter's ``elmtune.json`` (``{}`` for a base model or an adapter from elsewhere) and the
        ``--template`` / ``--chat-template`` overrides."""
        if isinstance(template, Template):
            chosen = template
        elif template:
            chosen = Template.parse(template)
        else:
            chosen = Template(**metadata["template"]) if "template" in metadata else Template.parse("openelm-sep")
        formats = metadata.get("formats") or {}
        as_chat = not template and (bool(chat_template) or (bool(formats) and not formats.get("alpaca")))
        return cls(tokenizer, chosen, chat_template_for_adapter(metadata, tokenizer, chat_template), as_chat)

    def plain(self, text: str) -> RenderedPrompt:
        """``[bos] + tokens(text)``: a prompt template's text as the tutorial's path encodes it, or plain text."""
        head = [self.tokenizer.bos_id] if self.tokenizer.bos_id is not None else []
        return RenderedPrompt(text, head + self.tokenizer.encode([text])[0])

    def instruction(self, instruction: str, input: str = "", where: str = "prompt") -> RenderedPrompt:
        """The prompt for one instruction (and optional input)."""
        if self.instructions_as_chat:
            if not (instruction + input).strip():
                raise DataError(f"{where}: the instruction is empty (a user turn needs text)")
            return render_prompt([{"role": "user", "content": instruction + input}], self.tokenizer,
                                 self.chat_template, where=where)
        return self.plain(self.template.prompt(instruction, input))

    def conversation(self, messages: list, continue_final_message: bool = True, where: str = "request") \
            -> RenderedPrompt:
        """The prompt for the next assistant turn of ``messages`` (OpenAI-style: role and content; ShareGPT keys
        too), with the chat template; a final assistant message is continued (``continue_final_message``).
        Where instructions use the prompt template, a conversation that is one user turn (after any system
        messages) is that instruction, the system texts first and joined with newlines — as before chat
        templates, and as ``openelm`` renders it.  Bad messages raise :class:`~elmtune.data.DataError` naming
        ``where``."""
        normalized = normalize_messages(list(messages), where)
        *before, last = normalized
        if (not self.instructions_as_chat and last["role"] == "user"
                and all(m["role"] == "system" for m in before)):
            return self.instruction("\n".join(m["content"] for m in normalized))
        return render_prompt(normalized, self.tokenizer, self.chat_template,
                             continue_final_message=continue_final_message, where=where)


@dataclass
class Pipeline:
    """A model ready to generate: base (+ adapter), its tokenizer, and how prompts are rendered for it."""

    model: torch.nn.Module
    tokenizer: Tokenizer
    template: Template
    metadata: dict = field(default_factory=dict)
    prompter: Prompter | None = None

    def __post_init__(self):
        if self.prompter is None:
            self.prompter = Prompter.for_adapter(self.metadata, self.tokenizer, self.template)

    def render(self, instruction: str, input: str = "") -> str:
        """The prompt template's text for an instruction (the tutorial's path; see :meth:`prompt`)."""
        return self.template.prompt(instruction, input)

    def prompt(self, instruction: str, input: str = "") -> RenderedPrompt:
        """An instruction rendered as training rendered it (:meth:`Prompter.instruction`)."""
        return self.prompter.instruction(instruction, input)

    def chat_prompt(self, messages: list, continue_final_message: bool = True) -> RenderedPrompt:
        """A conversation rendered with the adapter's chat template (:meth:`Prompter.conversation`)."""
        return self.prompter.conversation(messages, continue_final_message)


def read_metadata(adapter: str | Path | None) -> dict:
    if adapter is None:
        return {}
    path = Path(adapter) / METADATA_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def prompt_fields(metadata: dict, override: str | None = None) -> Fields:
    """The record fields prompts are read from: ``override`` (a ``--fields`` spec), else those the adapter was
    trained with (its metadata), else the ``en`` preset."""
    if override:
        return Fields.parse(override)
    recorded = metadata.get("fields")
    if recorded:
        try:
            return Fields(recorded["instruction"], recorded.get("input") or None, recorded["output"])
        except (KeyError, TypeError, AttributeError):
            raise ValueError(f"the adapter's {METADATA_FILE} has unreadable fields {recorded!r}: "
                             "pass --fields") from None
    return Fields.parse("en")


def _has_tokenizer(directory: Path) -> bool:
    return any((directory / n).is_file() for n in ("tokenizer.model", "tokenizer.json"))


def load_pipeline(model: str | None = None, adapter: str | None = None, tokenizer: str | None = None,
                  template: str | None = None, dtype: str | torch.dtype | None = "auto", device: str | None = "auto",
                  adapter_name: str = "default", chat_template: str | None = None,
                  decode_kernel: bool = True) -> Pipeline:
    """Base model (a directory, hub id or preset) plus an optional adapter directory.

    Without ``model``, the adapter's recorded base model is used; without ``tokenizer``, the adapter's copy,
    then the model directory's; without ``template`` / ``chat_template``, the adapter's training templates —
    or, with no adapter, those in the model directory's ``elmtune.json`` (an ``elmtune merge`` or ``train
    --method full`` output) — see :meth:`Prompter.for_adapter`; a bad override fails before the model is loaded.
    ``device`` and ``dtype`` default to the best present (:mod:`elmtune.device`: the GPU in bf16 where it is
    native, …); the weights are loaded in ``dtype`` and then moved, so a 3B model never sits in fp32 on the GPU.
    On a CPU, 16-bit weights stay 16-bit and compute in fp32 through elmtune's decoding kernel where it runs and
    pays (:func:`elmtune.models.weights16.prepare`; ``decode_kernel=False`` keeps the model exactly as loaded).
    """
    from .device import pick_device, pick_dtype
    from .models.loading import load_model

    device = pick_device(device)
    dtype = pick_dtype(device, dtype)

    # the adapter's elmtune.json; without an adapter, the model's own (a merged or fully fine-tuned model has one)
    metadata = read_metadata(adapter if adapter is not None else model)
    if adapter is not None and not (Path(adapter) / "adapter_config.json").is_file():
        raise InferenceError(f"--adapter {adapter}: no adapter_config.json here (expected an `elmtune train` "
                             "output directory or a PEFT adapter)")
    model = model or metadata.get("base_model")
    if not model:
        raise InferenceError("no --model given (and no adapter metadata naming the base model)")
    candidates = [tokenizer] if tokenizer else [adapter, model]
    tokenizer_dir = next((c for c in candidates if c and (tokenizer or _has_tokenizer(Path(c)))), None)
    if tokenizer_dir is None:
        raise InferenceError("no tokenizer found with the adapter or the model; pass --tokenizer")
    tok = load_tokenizer(tokenizer_dir)
    prompter = Prompter.for_adapter(metadata, tok, template, chat_template)
    net = load_model(model, dtype=dtype, device=device)
    if adapter is not None:
        from peft import PeftModel

        net = PeftModel.from_pretrained(net, adapter, adapter_name=adapter_name)
    net = net.to(device)  # the adapter's weights too
    if device.type == "cpu" and decode_kernel:
        from .models.weights16 import prepare

        if done := prepare(net):
            log.info("decoding on the CPU from %s", done)
    return Pipeline(net.eval(), tok, prompter.template, metadata, prompter)


def generation_args(sampling: SamplingOptions, tok: Tokenizer, pads: torch.Tensor):
    """(GenerationConfig, logits processors) for ``sampling``; ``pads [b]`` is each row's left padding.

    The repetition penalty is transformers' own, told to skip each row's padding: with pad = eos, counting the
    padding would make a padded prompt less likely to stop than the same prompt alone.
    """
    greedy = sampling.temperature <= 0
    config = GenerationConfig(
        max_new_tokens=sampling.max_new_tokens, do_sample=not greedy, eos_token_id=tok.eos_id,
        pad_token_id=tok.pad_id, **({} if greedy else {"temperature": sampling.temperature, "top_p": sampling.top_p,
                                                        "top_k": sampling.top_k or None}))
    processors = LogitsProcessorList()
    if sampling.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(float(sampling.repetition_penalty),
                                                           prompt_ignore_length=pads))
    return config, processors


def decode_cache(model, tokens: int):
    """A KV cache for one ``generate`` call that fills buffers reserved for ``tokens`` (prompt + new tokens) in
    place instead of growing by concatenation at every step (:class:`~elmtune.models.decode.PreallocatedCache`)."""
    from .models.decode import PreallocatedCache

    return PreallocatedCache(model.config, reserve=tokens)


@dataclass
class Completion:
    prompt: str
    output: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (eos or a stop string) or "length"

    def to_dict(self) -> dict:
        return dict(vars(self))


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """``text`` up to the first stop string, and whether one was found."""
    cuts = [text.find(s) for s in stops if s and s in text]
    return (text[: min(cuts)], True) if cuts else (text, False)


@torch.no_grad()
def complete(pipeline: Pipeline, prompts: list[str | RenderedPrompt], sampling: SamplingOptions | None = None,
             batch_size: int = 16, streamer=None) -> list[Completion]:
    """Generate for already-rendered prompts, in left-padded batches (same greedy output as one at a time).
    A prompt is text (encoded as ``[bos] + tokens``, the tutorial's way) or a :class:`RenderedPrompt`, whose
    ids are fed as they are."""
    sampling = sampling or SamplingOptions()
    tok, model = pipeline.tokenizer, pipeline.model
    if sampling.seed is not None:
        torch.manual_seed(sampling.seed)
    device = next(model.parameters()).device
    head = [tok.bos_id] if tok.bos_id is not None else []
    plain = [p for p in prompts if isinstance(p, str)]
    fresh = iter(tok.encode(plain) if plain else [])
    encoded = [list(p.input_ids) if isinstance(p, RenderedPrompt) else head + next(fresh) for p in prompts]
    prompt_texts = [p.text if isinstance(p, RenderedPrompt) else p for p in prompts]
    results: list[Completion] = []
    for start in range(0, len(encoded), batch_size):
        chunk, texts = encoded[start:start + batch_size], prompt_texts[start:start + batch_size]
        width = max(map(len, chunk))
        pads = torch.tensor([width - len(c) for c in chunk], device=device)
        ids = torch.tensor([[tok.pad_id] * (width - len(c)) + c for c in chunk], device=device)
        mask = (torch.arange(width, device=device)[None] >= pads[:, None]).long()
        config, processors = generation_args(sampling, tok, pads)
        extra = {"stop_strings": sampling.stop, "tokenizer": tok.hf} if sampling.stop else {}
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config,
                             logits_processor=processors, streamer=streamer,
                             cache=decode_cache(model, width + sampling.max_new_tokens), **extra)
        for prompt, prompt_ids, row in zip(texts, chunk, out[:, width:].tolist()):
            stopped = tok.eos_id in row
            if stopped:
                row = row[: row.index(tok.eos_id)]
            text, hit = cut_at_stop(tok.decode(row), sampling.stop)
            results.append(Completion(prompt, text, len(prompt_ids), len(row), "stop" if stopped or hit else "length"))
    return results


def generate(pipeline: Pipeline, instructions: list[str], inputs: list[str] | None = None,
             sampling: SamplingOptions | None = None, batch_size: int = 16) -> list[Completion]:
    """Render each instruction (and optional input) as training did (:meth:`Pipeline.prompt`), then
    :func:`complete`."""
    inputs = inputs or [""] * len(instructions)
    prompts = [pipeline.prompt(i, x) for i, x in zip(instructions, inputs)]
    return complete(pipeline, prompts, sampling, batch_size)
