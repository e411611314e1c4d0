"""The generation engine behind the server: a worker thread that batches queued requests into one forward pass.

Requests wait in a queue; the worker takes up to ``max_batch_size`` of them at once, left-pads their prompts
and decodes them together step by step with one KV cache, each row with its own adapter (PEFT), sampling
settings, seed and stop strings.  Text is handed to each request's asyncio queue as it is produced, so a slow
reader never blocks the worker, and a request whose client went away is dropped from its batch at the next step.

A decode step makes the host wait for the device once: the whole batch is sampled on the device (:class:`Sampler`),
the sampled tokens are the next step's input as they are, and one ``.tolist()`` of them feeds the host-side work
(text, stop strings, eos, lengths).  What the host must know about the batch's shape (each row's length, so its
padding) it tracks itself instead of reading the attention mask back.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from ..inference import cut_at_stop
from ..models.decode import PreallocatedCache

BASE = "__base__"  # PEFT's name for "no adapter" in a mixed batch
GREEDY_BELOW = 1e-4  # a temperature under this is greedy (0 means greedy; dividing by a tiny one would overflow)


@dataclass
class Sampling:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)


@dataclass
class Request:
    prompt_ids: list[int]
    adapter: str | None
    sampling: Sampling
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def emit(self, kind: str, payload) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))


class TextStream:
    """Incremental detokenisation with stop strings: ``push(token)`` returns the new, final text (holding back
    an incomplete UTF-8 character or a possible start of a stop string)."""

    def __init__(self, decode, stops: list[str]):
        self.decode, self.stops = decode, stops
        self.ids: list[int] = []
        self.sent = ""
        self.stopped = False

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.decode(self.ids)  # the whole answer: bounded by the server's max_tokens limit
        cut, self.stopped = cut_at_stop(text, self.stops)
        if self.stopped:
            return self._advance(cut)
        if text.endswith("\ufffd"):
            return ""
        hold = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        return self._advance(text[: len(text) - hold])

    def finish(self) -> str:
        """At the end: release anything held back (a stop-string prefix that never completed)."""
        return "" if self.stopped else self._advance(self.decode(self.ids))

    def _advance(self, text: str) -> str:
        delta = text[len(self.sent):] if text.startswith(self.sent) else ""
        self.sent = text if text.startswith(self.sent) else self.sent
        return delta


class Sampler:
    """The next token of every row of a batch at once, on the device, each row with its own settings.

    Settings live in ``[b, 1]`` tensors (built once per batch composition, not per step).  Greedy rows take the
    argmax; the others are drawn by an exponential race (``argmax(p / E)``, ``E ~ Exp(1)``: token i wins with
    probability p_i), with the noise of a seeded row drawn from that row's own generator, so its draws do not
    depend on the batch it shares.  Top-k and top-p are applied in one sort of the scores.
    """

    def __init__(self, settings: list[Sampling], generators: list[torch.Generator | None], vocab: int,
                 device: torch.device):
        greedy = [s.temperature < GREEDY_BELOW for s in settings]
        self.all_greedy = all(greedy)
        self.penalised = any(s.repetition_penalty != 1.0 for s in settings)
        sampled = [s for s, g in zip(settings, greedy) if not g]
        self.filtered = any(s.top_k or s.top_p < 1.0 for s in sampled)
        self.seeded = [(i, gen) for i, (gen, g) in enumerate(zip(generators, greedy)) if gen is not None and not g]
        table = torch.tensor([[s.repetition_penalty for s in settings],
                              [1.0 if g else s.temperature for s, g in zip(settings, greedy)],
                              [min(s.top_k or vocab, vocab) - 1 for s in settings],  # the k-th's sorted index
                              [s.top_p for s in settings],
                              greedy], dtype=torch.float32).to(device)  # one copy to the device per batch change
        self.penalty, self.temperature, self.top_p = table[0, :, None], table[1, :, None], table[3, :, None]
        self.kth, self.greedy = table[2, :, None].long(), table[4].bool()

    def __call__(self, logits: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
        """``logits [b, vocab]`` → tokens ``[b]`` (on the device); ``seen [b, vocab]`` marks each row's prompt and
        output tokens (for the repetition penalty)."""
        scores = logits.float()
        if self.penalised:  # a row with penalty 1 is unchanged: x * 1 and x / 1 are exact
            penalised = torch.where(scores < 0, scores * self.penalty, scores / self.penalty)
            scores = torch.where(seen, penalised, scores)
        greedy = scores.argmax(-1)
        if self.all_greedy:
            return greedy
        scores = scores / self.temperature
        if self.filtered:
            ordered, order = scores.sort(-1, descending=True)
            cut = ordered < ordered.gather(-1, self.kth)  # top-k: below the k-th score (ties with it stay)
            probs = ordered.masked_fill(cut, float("-inf")).softmax(-1)
            cut |= (probs.cumsum(-1) - probs > self.top_p) & (self.top_p < 1.0)  # top-p: the smallest set reaching p
            scores = scores.masked_fill(torch.zeros_like(cut).scatter(-1, order, cut), float("-inf"))
        noise = torch.empty_like(scores).exponential_()  # unseeded rows: the default generator
        for i, generator in self.seeded:
            noise[i].exponential_(generator=generator)
        sampled = (scores.softmax(-1) / noise.clamp_(min=torch.finfo(noise.dtype).tiny)).argmax(-1)
        return torch.where(self.greedy, greedy, sampled)


@dataclass
class _Row:
    """One request inside the running batch."""

    request: Request
    stream: TextStream
    generator: torch.Generator | None
    length: int  # the mask columns this row attends to (prompt and tokens fed back): its last `length` columns
    generated: int = 0
    done: bool = False


@dataclass
class _Batch:
    """The running batch: its rows, and what the device holds for them (row i at index i everywhere)."""

    rows: list[_Row]
    cache: DynamicCache
    mask: torch.Tensor  # [b, t] long: 1 where a row attends (left padding)
    seen: torch.Tensor  # [b, vocab] bool: tokens of each row's prompt and output (for the repetition penalty)
    sampler: Sampler
    tokens: torch.Tensor | None = None  # [b] long: each row's last sampled token, the next step's input

    def merge(self, other: _Batch) -> _Batch:
        self.cache, self.mask = _merge(self.cache, self.mask, other.cache, other.mask)
        self.rows = self.rows + other.rows
        self.tokens, self.seen = torch.cat([self.tokens, other.tokens]), torch.cat([self.seen, other.seen])
        self.sampler = _sampler(self.rows, self.seen)
        return self

    def drop_done(self) -> _Batch | None:
        """Remove finished rows, and the leading columns no remaining row attends to (None when none is left).

        Only when rows leave are the kept rows' index and their sampling settings copied to the device: right
        after a step's read-back, when the device has no queued work to wait for."""
        keep = [i for i, r in enumerate(self.rows) if not r.done]
        if not keep:
            return None
        if len(keep) < len(self.rows):
            index = torch.tensor(keep, device=self.mask.device)
            self.cache.batch_select_indices(index)
            self.mask, self.tokens, self.seen = self.mask[index], self.tokens[index], self.seen[index]
            self.rows = [self.rows[i] for i in keep]
            self.sampler = _sampler(self.rows, self.seen)
            first = self.mask.shape[1] - max(r.length for r in self.rows)  # known here: no need to ask the mask
            if first:
                for layer in self.cache.layers:
                    layer.keys, layer.values = layer.keys[..., first:, :], layer.values[..., first:, :]
                self.mask = self.mask[:, first:]
        return self


def _sampler(rows: list[_Row], seen: torch.Tensor) -> Sampler:
    return Sampler([r.request.sampling for r in rows], [r.generator for r in rows], seen.shape[1], seen.device)


def _generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    if seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


class Engine:
    """Owns the model; serves :class:`Request` objects from any thread or event loop.

    Continuous batching: a request that arrives while others are decoding is prefilled on its own and joins the
    running batch at the next step (its KV cache left-padded to the batch's length), and a finished or
    abandoned row leaves the batch at once, so a long generation never holds a short one back.
    """

    def __init__(self, model, tokenizer, max_batch_size: int = 16, batch_wait_ms: float = 5.0):
        self.model, self.tokenizer = model, tokenizer
        self.max_batch_size = max_batch_size
        self.batch_wait = batch_wait_ms / 1000
        self.queue: queue.Queue[Request | None] = queue.Queue()
        self.active = 0
        self.steps = 0  # batched decode steps run so far (forward passes over the running batch)
        self.prefills = 0  # prefill passes (each admits one or more new requests)
        self.device = next(model.parameters()).device
        self.peft = hasattr(model, "peft_config")
        self._adapter_layers_on: bool | None = None  # unknown until the first batch sets it
        self._active_adapter = model.active_adapter if self.peft else None
        self._closing = False
        self._thread = threading.Thread(target=self._work, name="elmtune-engine", daemon=True)
        self._thread.start()

    @property
    def queued(self) -> int:
        return self.queue.qsize()

    def submit(self, request: Request) -> None:
        self.queue.put(request)

    def close(self) -> None:
        self.queue.put(None)
        self._thread.join(timeout=10)

    # ------------------------------------------------------------------------------------------- worker

    def _take(self, block: bool, room: int) -> list[Request]:
        """New requests: wait for one when idle (then briefly for company), else only what is already queued."""
        taken: list[Request] = []
        deadline = None
        while len(taken) < room:
            try:
                if block and not taken:
                    item = self.queue.get()
                    deadline = time.monotonic() + self.batch_wait  # from the first arrival, not from going idle
                elif block:
                    item = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
                else:
                    item = self.queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                self._closing = True
                break
            if not item.cancelled.is_set():
                taken.append(item)
        return taken

    def _work(self) -> None:
        batch: _Batch | None = None
        while not self._closing:
            new = self._take(block=batch is None, room=self.max_batch_size - (len(batch.rows) if batch else 0))
            try:
                if new:
                    joined = self._prefill(new)
                    batch = (joined if batch is None else batch.merge(joined)).drop_done()
                if batch is not None:
                    self._step(batch)
                    batch = batch.drop_done()
            except Exception as error:  # never let one bad batch kill the server: fail its requests
                running = [row.request for row in batch.rows] if batch is not None else []
                failed = running + [r for r in new if all(r is not known for known in running)]
                for request in failed:
                    request.emit("error", f"generation failed: {type(error).__name__}: {error}")
                batch = None
            self.active = len(batch.rows) if batch is not None else 0

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor | None, cache: DynamicCache, rows: list[_Row],
                 positions: torch.Tensor | None = None) -> torch.Tensor:
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
                         logits_to_keep=1, **self._adapters_for(rows))
        return out.logits[:, -1]

    def _adapters_for(self, rows: list[_Row]) -> dict:
        """Set the PEFT model up for these rows' adapters; returns the keyword its forward pass then needs.

        Only a mixed batch takes PEFT's mixed-adapter path (``adapter_names``: every LoRA layer splits its input
        by adapter, with index lists copied to the device layer by layer).  When every row uses one adapter, that
        adapter is made the active one; when every row uses the base, the adapter layers are switched off — each
        only when it changes, not per step (``disable_adapter()`` as a context would switch them off and on, and
        survey the model, at every step)."""
        if not self.peft:
            return {}
        names = [r.request.adapter or BASE for r in rows]
        if len(set(names)) > 1:
            self._adapter_layers(on=True)
            return {"adapter_names": names}
        self._adapter_layers(on=names[0] != BASE)
        if names[0] != BASE and names[0] != self._active_adapter:
            self.model.set_adapter(names[0], inference_mode=True)
            self._active_adapter = names[0]
        return {}

    def _adapter_layers(self, on: bool) -> None:
        if on != self._adapter_layers_on:
            (self.model.base_model.enable_adapter_layers if on else self.model.base_model.disable_adapter_layers)()
            self._adapter_layers_on = on

    @torch.no_grad()
    def _prefill(self, requests: list[Request]) -> _Batch:
        tok = self.tokenizer
        width = max(len(r.prompt_ids) for r in requests)
        ids = torch.tensor([[tok.pad_id] * (width - len(r.prompt_ids)) + r.prompt_ids for r in requests],
                           device=self.device)
        mask = torch.tensor([[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in requests],
                            device=self.device)
        rows = [_Row(r, TextStream(tok.decode, r.sampling.stop), _generator(r.sampling.seed, self.device),
                     len(r.prompt_ids)) for r in requests]
        # in-place writes into reserved room (the longest prompt + answer here); rows that join later make it grow
        cache = PreallocatedCache(self.model.config, reserve=width + max(r.sampling.max_tokens for r in requests))
        logits = self._forward(ids, mask, cache, rows)
        self.prefills += 1
        seen = torch.zeros(logits.shape, dtype=mask.dtype, device=self.device).scatter_add_(1, ids, mask) > 0
        batch = _Batch(rows, cache, mask, seen, _sampler(rows, seen))  # seen: the prompts' tokens, not the padding
        self._accept(batch, logits)
        return batch

    @torch.no_grad()
    def _step(self, batch: _Batch) -> None:
        batch.mask = torch.cat([batch.mask, torch.ones_like(batch.mask[:, :1])], dim=1)  # the fed tokens' column
        for row in batch.rows:
            row.length += 1
        positions = batch.mask.sum(1, keepdim=True) - 1  # left padding: each row counts from its first token
        logits = self._forward(batch.tokens[:, None], self._step_mask(batch), batch.cache, batch.rows, positions)
        self.steps += 1
        self._accept(batch, logits)

    def _step_mask(self, batch: _Batch) -> torch.Tensor | None:
        """The attention mask of a decode step, without asking the device whether the batch has padding.

        Given the ``[b, t]`` mask, transformers reads it back (a sync every step) to see whether SDPA may run
        unmasked; the host knows that from the rows' lengths.  A step's single query may attend to every earlier
        column, so for SDPA and eager attention its ``[b, 1, 1, t]`` mask is just the padding mask: the one
        transformers would build.  Flash kernels take the 2D mask as it is."""
        if all(r.length == batch.mask.shape[1] for r in batch.rows):
            return None
        if self.model.config._attn_implementation in ("sdpa", "eager"):
            return batch.mask.bool()[:, None, None, :]
        return batch.mask

    def _accept(self, batch: _Batch, logits: torch.Tensor) -> None:
        """Sample every row's next token, stream its text, and close rows that are finished or abandoned."""
        tokens = batch.sampler(logits, batch.seen)
        batch.seen.scatter_(1, tokens[:, None], True)
        batch.tokens = tokens  # the next step's input, straight from the device
        for row, token in zip(batch.rows, tokens.tolist()):  # the step's one read-back from the device
            request = row.request
            if request.cancelled.is_set():
                row.done = True
                continue
            if token == self.tokenizer.eos_id:
                self._finish(row, "stop")
                continue
            row.generated += 1
            delta = row.stream.push(token)
            if delta:
                request.emit("text", delta)
            if row.stream.stopped:
                self._finish(row, "stop")
            elif row.generated >= request.sampling.max_tokens:
                self._finish(row, "length")

    @staticmethod
    def _finish(row: _Row, reason: str) -> None:
        tail = row.stream.finish()
        if tail:
            row.request.emit("text", tail)
        row.request.emit("done", {"finish_reason": reason, "prompt_tokens": len(row.request.prompt_ids),
                                  "completion_tokens": row.generated})
        row.done = True


def _merge(cache: DynamicCache, mask: torch.Tensor, other: DynamicCache, other_mask: torch.Tensor):
    """Append ``other``'s rows to ``cache``, left-padding the shorter side with masked-out zeros.

    A DynamicCache keeps one layer object per decoder layer with ``keys`` / ``values`` tensors of shape
    ``[batch, kv_heads, time, head_dim]`` (kv_heads differ per OpenELM layer)."""
    length, other_length = mask.shape[1], other_mask.shape[1]
    width = max(length, other_length)
    for layer, extra in zip(cache.layers, other.layers):
        keys = [F.pad(layer.keys, (0, 0, width - length, 0)), F.pad(extra.keys, (0, 0, width - other_length, 0))]
        values = [F.pad(layer.values, (0, 0, width - length, 0)), F.pad(extra.values, (0, 0, width - other_length, 0))]
        layer.keys, layer.values = torch.cat(keys), torch.cat(values)
    mask = torch.cat([F.pad(mask, (width - length, 0)), F.pad(other_mask, (width - other_length, 0))])
    return cache, mask


async def run_request(engine: Engine, request: Request):
    """Submit ``request`` and yield ``("text", str)`` pieces, then one ``("done", info)``; cancels on exit."""
    engine.submit(request)
    try:
        while True:
            kind, payload = await request.events.get()
            if kind == "error":
                raise RuntimeError(payload)
            yield kind, payload
            if kind == "done":
                return
    finally:
        request.cancelled.set()  # the client went away (or we are done): free the slot
