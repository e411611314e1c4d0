"""The generation engine behind the server: a worker thread that batches queued requests into one forward pass.

Requests wait in a queue; the worker takes up to ``max_batch_size`` of them at once, left-pads their prompts
and decodes them together step by step with one KV cache, each row with its own adapter (PEFT mixed-adapter
batches), sampling settings, seed and stop strings.  Text is handed to each request's asyncio queue as it is
produced, so a slow reader never blocks the worker, and a request whose client went away is dropped from its
batch at the next step (its slot is free as soon as its batch ends, at the latest).
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

BASE = "__base__"  # PEFT's name for "no adapter" in a mixed batch


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


def pick_tokens(logits: torch.Tensor, rows: list[Sampling], seen: list[torch.Tensor],
                generators: list[torch.Generator | None]) -> list[int]:
    """Next token for each row of ``logits [b, vocab]`` with that row's own settings; ``seen[i] [vocab]`` marks
    the tokens of row i's prompt and output (for the repetition penalty)."""
    tokens = []
    for i, s in enumerate(rows):
        scores = logits[i].float()
        if s.repetition_penalty != 1.0:
            penalised = torch.where(scores < 0, scores * s.repetition_penalty, scores / s.repetition_penalty)
            scores = torch.where(seen[i], penalised, scores)
        if s.temperature < 1e-4:  # 0 means greedy; dividing by a tiny temperature would overflow anyway
            tokens.append(int(scores.argmax()))
            continue
        scores = scores / s.temperature
        if s.top_k:
            kth = torch.topk(scores, min(s.top_k, scores.numel())).values[-1]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if s.top_p < 1.0:
            ordered, order = scores.sort(descending=True)
            probs = ordered.softmax(-1)
            drop = probs.cumsum(-1) - probs > s.top_p  # keep the smallest set reaching top_p
            scores[order[drop]] = float("-inf")
        probs = scores.softmax(-1)
        tokens.append(int(torch.multinomial(probs, 1, generator=generators[i])))
    return tokens


@dataclass
class _Row:
    """One request inside the running batch."""

    request: Request
    stream: TextStream
    seen: torch.Tensor  # [vocab] bool: tokens of the prompt and output so far
    generator: torch.Generator | None
    pending: int = -1  # the sampled token the next forward pass feeds in
    generated: int = 0
    done: bool = False


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
        rows: list[_Row] = []
        cache, mask = None, None
        while not self._closing:
            new = self._take(block=not rows, room=self.max_batch_size - len(rows))
            try:
                if new:
                    new_rows, new_cache, new_mask = self._prefill(new)
                    cache, mask = (new_cache, new_mask) if cache is None else _merge(cache, mask, new_cache, new_mask)
                    rows += new_rows
                    rows, cache, mask = _drop_done(rows, cache, mask)
                if rows:
                    mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)  # the pending tokens' column
                    self._step(rows, cache, mask)
                    rows, cache, mask = _drop_done(rows, cache, mask)
            except Exception as error:  # never let one bad batch kill the server: fail its requests
                failed = [row.request for row in rows] + [r for r in new if all(r is not row.request for row in rows)]
                for request in failed:
                    request.emit("error", f"generation failed: {type(error).__name__}: {error}")
                rows, cache, mask = [], None, None
            if not rows:
                cache, mask = None, None
            self.active = len(rows)

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, cache: DynamicCache, rows: list[_Row]) -> torch.Tensor:
        extra = {"adapter_names": [r.request.adapter or BASE for r in rows]} if self.peft else {}
        out = self.model(input_ids=ids, attention_mask=mask, cache=cache, use_cache=True, logits_to_keep=1, **extra)
        return out.logits[:, -1]

    @torch.no_grad()
    def _prefill(self, requests: list[Request]) -> tuple[list[_Row], DynamicCache, torch.Tensor]:
        tok = self.tokenizer
        width = max(len(r.prompt_ids) for r in requests)
        ids = torch.tensor([[tok.pad_id] * (width - len(r.prompt_ids)) + r.prompt_ids for r in requests],
                           device=self.device)
        mask = torch.tensor([[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in requests],
                            device=self.device)
        rows = []
        for r in requests:
            generator = None
            if r.sampling.seed is not None:
                generator = torch.Generator(device=self.device)
                generator.manual_seed(r.sampling.seed)
            seen = torch.zeros(self.model.config.vocab_size, dtype=torch.bool, device=self.device)
            seen[torch.tensor(r.prompt_ids, device=self.device)] = True
            rows.append(_Row(r, TextStream(tok.decode, r.sampling.stop), seen, generator))
        cache = DynamicCache(config=self.model.config)
        logits = self._forward(ids, mask, cache, rows)
        self.prefills += 1
        self._accept(rows, logits)
        return rows, cache, mask

    @torch.no_grad()
    def _step(self, rows: list[_Row], cache: DynamicCache, mask: torch.Tensor) -> None:
        ids = torch.tensor([[r.pending] for r in rows], device=self.device)
        logits = self._forward(ids, mask, cache, rows)  # mask already has the pending tokens' column
        self.steps += 1
        self._accept(rows, logits)

    def _accept(self, rows: list[_Row], logits: torch.Tensor) -> None:
        """Sample each row's next token, stream its text, and close rows that are finished or abandoned."""
        tokens = pick_tokens(logits, [r.request.sampling for r in rows], [r.seen for r in rows],
                             [r.generator for r in rows])
        for row, token in zip(rows, tokens):
            request = row.request
            if request.cancelled.is_set():
                row.done = True
                continue
            if token == self.tokenizer.eos_id:
                self._finish(row, "stop")
                continue
            row.seen[token] = True
            row.pending = token
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


def _drop_done(rows: list[_Row], cache: DynamicCache, mask: torch.Tensor):
    """Remove finished rows from the batch, and the leading columns no remaining row attends to."""
    keep = [i for i, r in enumerate(rows) if not r.done]
    if not keep:
        return [], None, None
    if len(keep) < len(rows):
        index = torch.tensor(keep, device=mask.device)
        cache.batch_select_indices(index)
        mask = mask[index]
    first = int(mask.any(0).nonzero()[0])
    if first:
        for layer in cache.layers:
            layer.keys, layer.values = layer.keys[..., first:, :], layer.values[..., first:, :]
        mask = mask[:, first:]
    return [rows[i] for i in keep], cache, mask


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
