"""Chat templates: conversations rendered with transformers' chat-template machinery, cut into segments that
never straddle a role boundary, and tokenized segment by segment.

Rendering is transformers' own (``render_jinja_template``, the renderer behind ``apply_chat_template``, with the
tokenizer's special tokens as template variables, as ``apply_chat_template`` passes them; the growing
conversations below go straight to the same compiled template).  What belongs to which turn comes from rendering
the growing conversation: turn ``k`` is the text that ``messages[:k+1]`` renders beyond
``messages[:k]``, and an assistant turn's header (``<|im_start|>assistant\\n``, or nothing) is what the generation
prompt adds.  The supervised part of an assistant turn is its ``{% generation %}`` block when the template has
those markers, else the rest of the turn (its content and end token) without trailing whitespace — both give
the same spans on the built-in templates (tested).  A template that renders earlier turns differently as the
conversation grows cannot be split this way and is refused with a clear error.

The rendered text is cut at every turn boundary, at both ends of every assistant turn's supervised span (for
every assistant turn, whatever ``--train-on`` says, so the token ids never depend on it) and around the
template's control tokens (bos, eos and the tokenizer's other added tokens, which become their ids; inside
message content such strings stay text).  Each remaining piece is tokenized on its own with the training
tokenizer — as the tutorial tokenizes its prompt and its answer — so no token crosses a boundary, and the
built-in ``openelm`` template gives a one-turn conversation exactly the tutorial's ``openelm-sep`` tokens.
With SentencePiece each piece starts a new word (its dummy-prefix ``▁``), as the tutorial's answer does.

:func:`render_prompt` renders a conversation for generation the same way, so inference and serving feed the
model exactly the tokens training put before an assistant turn.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass, field
from pathlib import Path

from .records import DataError

#: The tutorial's convention extended to many turns: system text first (then a newline), each user turn
#: followed by ``<sep>``, each assistant turn by eos.  A one-turn conversation renders as ``openelm-sep``'s
#: ``{instruction}{input}<sep>`` prompt and answer.  The generation prompt adds nothing: ``<sep>`` ends the
#: user turn already.
OPENELM_TEMPLATE = (
    "{{- bos_token if bos_token else '' -}}\n"
    "{%- for message in messages -%}\n"
    "    {%- if message['role'] == 'system' -%}\n"
    "        {{- message['content'] + '\\n' -}}\n"
    "    {%- elif message['role'] == 'user' -%}\n"
    "        {{- message['content'] + '<sep>' -}}\n"
    "    {%- elif message['role'] == 'assistant' -%}\n"
    "        {%- generation -%}{{- message['content'] + (eos_token if eos_token else '') -}}{%- endgeneration -%}\n"
    "    {%- else -%}\n"
    "        {{- raise_exception('the openelm template knows the roles system, user and assistant, not '"
    " + message['role']) -}}\n"
    "    {%- endif -%}\n"
    "{%- endfor -%}\n"
)

#: ChatML (``<|im_start|>role\\n…<|im_end|>\\n``), for tokenizers that have its tokens or models trained on it.
CHATML_TEMPLATE = (
    "{%- for message in messages -%}\n"
    "    {{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' -}}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{- '<|im_start|>assistant\\n' -}}\n"
    "{%- endif -%}\n"
)

BUILTIN_TEMPLATES = {"openelm": OPENELM_TEMPLATE, "chatml": CHATML_TEMPLATE}
TEMPLATE_NAMES = ("auto", "tokenizer", *BUILTIN_TEMPLATES)
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


class TemplateError(DataError):
    """A conversation the chat template refuses or cannot be split by turn; the message says which and why."""


@dataclass(frozen=True)
class ChatTemplate:
    """A chat template's Jinja source and where it came from (``openelm``, ``chatml``, ``tokenizer``, ``file:PATH``
    or ``custom``).  The source itself is what an adapter saves, so inference renders with exactly it."""

    name: str
    source: str

    @classmethod
    def parse(cls, spec: str | None) -> "ChatTemplate | None":
        """A ``--chat-template`` value: ``auto`` (None: decided by the tokenizer), ``tokenizer`` (kept as a name
        until a tokenizer resolves it), a built-in name, a Jinja file, or a template string."""
        if spec is None or spec == "auto":
            return None
        if spec == "tokenizer":
            return cls("tokenizer", "")
        if spec in BUILTIN_TEMPLATES:
            return cls(spec, BUILTIN_TEMPLATES[spec])
        if "{{" in spec or "{%" in spec:
            template = cls("custom", spec)
        else:
            path = Path(spec).expanduser()
            if not path.is_file():
                raise ValueError(f"--chat-template {spec!r}: not a template name ({', '.join(TEMPLATE_NAMES)}), "
                                 "not a file, and not a Jinja template string")
            try:
                source = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise ValueError(f"--chat-template {spec}: cannot read it ({e})") from None
            template = cls(f"file:{path}", source)
        template.check()
        return template

    @classmethod
    def resolve(cls, spec: "str | ChatTemplate | None", tokenizer) -> "ChatTemplate":
        """The template to render with: ``spec`` (parsed if a string), with ``auto`` (None) meaning the
        tokenizer's own ``chat_template`` when it has one, else ``openelm``."""
        template = spec if isinstance(spec, ChatTemplate) or spec is None else cls.parse(spec)
        own = getattr(tokenizer.hf, "chat_template", None)
        if isinstance(own, dict):  # several named templates: the default one
            own = own.get("default")
        if template is None:
            return cls("tokenizer", own) if own else cls("openelm", OPENELM_TEMPLATE)
        if template.name == "tokenizer":
            if not own:
                raise ValueError(f"--chat-template tokenizer: the tokenizer in {tokenizer.directory} has no "
                                 "chat_template")
            return cls("tokenizer", own)
        return template

    @property
    def has_generation_markers(self) -> bool:
        return bool(_GENERATION_TAG.search(self.source))

    def check(self) -> None:
        """Refuse a template with a Jinja syntax error now, not at the first record."""
        import jinja2

        try:
            _render(self, [[{"role": "user", "content": "x"}]], {}, add_generation_prompt=True)
        except jinja2.TemplateSyntaxError as e:
            raise ValueError(f"--chat-template {self.name}: Jinja syntax error at line {e.lineno}: {e.message}") \
                from None
        except Exception:  # noqa: BLE001 — the template may refuse this probe (roles, system…): fine here
            pass

    def to_dict(self) -> dict:
        return {"name": self.name, "source": self.source}

    @classmethod
    def from_dict(cls, saved: dict) -> "ChatTemplate":
        return cls(str(saved["name"]), str(saved["source"]))


def _render(template: ChatTemplate, conversations: list[list[dict]], special_tokens: dict, *,
            add_generation_prompt: bool = False, markers: bool = False, continue_final_message: bool = False):
    """transformers' renderer, as ``apply_chat_template(tokenize=False)`` calls it: (texts, generation spans)."""
    from transformers.utils.chat_template_utils import render_jinja_template

    return render_jinja_template(conversations=conversations, chat_template=template.source,
                                 return_assistant_tokens_mask=markers, add_generation_prompt=add_generation_prompt,
                                 continue_final_message=continue_final_message, **special_tokens)


def _compiled(source: str):
    """transformers' compiled, cached template (the sandboxed environment ``apply_chat_template`` renders in), or
    None where transformers does not offer it under this name."""
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template

        return _compile_jinja_template(source)
    except (ImportError, AttributeError, TypeError):
        return None


def _render_prefixes(template: ChatTemplate, conversations: list[list[dict]], special_tokens: dict,
                     add_generation_prompt: bool) -> list[str]:
    """The growing conversations, rendered by the same compiled template (transformers' sandboxed environment,
    cached per template) without ``render_jinja_template``'s per-call copying, which costs 3-4x the rendering
    on short turns; our messages are plain role/content strings already.  Falls back to the public renderer
    should transformers move its compiler.  Every prefix is checked against the full rendering anyway."""
    compiled = _compiled(template.source)
    if compiled is None:
        return _render(template, conversations, special_tokens, add_generation_prompt=add_generation_prompt)[0]
    return [compiled.render(messages=messages, tools=None, documents=None, add_generation_prompt=add_generation_prompt,
                            **special_tokens) for messages in conversations]


@dataclass
class Piece:
    """A stretch of rendered text tokenized on its own.  ``units`` are its text chunks and control-token ids in
    order; ``ids`` are filled in by :func:`tokenize_pieces`.  ``span`` is the assistant turn whose supervised
    span (content and end token) holds the piece, or None; ``turn`` the message it belongs to."""

    text: str
    turn: int
    role: str
    span: int | None = None
    units: list = field(default_factory=list)
    ids: list[int] = field(default_factory=list)


@dataclass
class Rendered:
    text: str
    pieces: list[Piece]
    assistant_turns: list[int]  # message indices of the assistant turns, in order


def _special_tokens(tokenizer) -> dict:
    return dict(tokenizer.hf.special_tokens_map)


def _control_tokens(tokenizer) -> tuple[re.Pattern, dict[str, int]]:
    """Strings the template may write that are tokens of their own: the tokenizer's added tokens (bos, eos,
    unk, <|im_start|>, …), longest first; whitespace-only ones stay text."""
    cached = getattr(tokenizer, "_elmtune_control", None)
    if cached is None:
        ids = {t.content: i for i, t in tokenizer.hf.added_tokens_decoder.items() if t.content.strip()}
        pattern = re.compile("|".join(map(re.escape, sorted(ids, key=len, reverse=True))) or "(?!)")
        cached = (pattern, ids)
        try:
            object.__setattr__(tokenizer, "_elmtune_control", cached)
        except AttributeError:
            pass
    return cached


def _content_range(text: str, start: int, end: int, content: str, pattern: re.Pattern) -> tuple[int, int] | None:
    """Where a message's content sits in its turn's text (templates may strip it), or None.  An occurrence that
    cuts through one of the template's control tokens (content ``s`` inside ``<s>``) is not it."""
    controls = [m.span() for m in pattern.finditer(text, start, end)]
    for candidate in (content, content.strip()):
        at = text.find(candidate, start, end) if candidate else -1
        while at >= 0:
            b = at + len(candidate)
            if all(q <= at or b <= p or (at <= p and q <= b) for p, q in controls):
                return at, b
            at = text.find(candidate, at + 1, end)
    return None


def _units(text: str, start: int, protected: list[tuple[int, int]], pattern: re.Pattern,
           ids: dict[str, int]) -> list:
    """``text`` (which starts at offset ``start`` of the rendering) as text chunks and control-token ids; control
    tokens inside a message's content (``protected``) stay text."""
    units, last = [], 0
    for match in pattern.finditer(text):
        a, b = start + match.start(), start + match.end()
        if any(p < b and a < q for p, q in protected):
            continue
        if match.start() > last:
            units.append(text[last:match.start()])
        units.append(ids[match.group()])
        last = match.end()
    if last < len(text):
        units.append(text[last:])
    return units


def split_conversation(messages: list[dict], template: ChatTemplate, tokenizer, *, add_generation_prompt=False,
                       continue_final_message=False, where: str = "conversation") -> Rendered:
    """Render ``messages`` (normalized: role and string content) and cut the text into pieces (see the module
    docstring).  ``add_generation_prompt`` appends the next assistant turn's header (an unsupervised piece of
    turn ``len(messages)``); ``continue_final_message`` leaves the last message open.  Raises
    :class:`TemplateError` when the template refuses the conversation or cannot be split by turn."""
    import jinja2

    n = len(messages)
    if add_generation_prompt and continue_final_message:
        raise ValueError("add_generation_prompt and continue_final_message exclude each other")
    if continue_final_message and messages[-1]["role"] != "assistant":
        raise ValueError("continue_final_message continues a final assistant message")
    special = _special_tokens(tokenizer)
    markers = template.has_generation_markers
    assistant = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
    try:
        [full], spans = _render(template, [messages], special, markers=markers)
        prefixes = _render_prefixes(template, [messages[:k] for k in range(1, n)], special, False) + [full]
        heads = _render_prefixes(template, [messages[:k] for k in assistant], special, True)
        if add_generation_prompt:
            [final], _ = _render(template, [messages], special, add_generation_prompt=True)
        elif continue_final_message:
            [final], _ = _render(template, [messages], special, continue_final_message=True)
    except jinja2.TemplateError as e:
        raise TemplateError(f"{where}: the chat template ({template.name}) refuses this conversation: "
                            f"{getattr(e, 'message', None) or e}") from None
    bounds = [0] + [len(p) for p in prefixes]
    for k, prefix in enumerate(prefixes):
        if not full.startswith(prefix) or bounds[k + 1] < bounds[k]:
            raise TemplateError(f"{where}: the chat template ({template.name}) renders turn {k} differently once "
                                "later turns follow, so tokens cannot be assigned to turns; use a template that "
                                "renders a conversation turn by turn")
    text = full
    if add_generation_prompt:
        if not final.startswith(full):
            raise TemplateError(f"{where}: the chat template ({template.name}) renders the conversation "
                                "differently with a generation prompt")
        text = final
    elif continue_final_message:  # the last assistant turn left open: its header and content, no end token
        if not (final.startswith(heads[-1]) and full.startswith(final)):
            raise TemplateError(f"{where}: the chat template ({template.name}) cannot continue this message")
        text = final

    # Each assistant turn's supervised span: its {% generation %} block, else the turn after its header.
    supervised: dict[int, tuple[int, int]] = {}
    for k, head in zip(assistant, heads):
        start, end = bounds[k], bounds[k + 1]
        if not (full.startswith(head) and start <= len(head) <= end):
            raise TemplateError(f"{where}: the chat template ({template.name}) renders the generation prompt "
                                f"for turn {k} differently from the turn itself")
        if markers:
            inside = [(a, b) for a, b in spans[-1] if start <= a and b <= end and b > a]
            if not inside:
                raise TemplateError(f"{where}: the chat template ({template.name}) marks no {{% generation %}} "
                                    f"text in assistant turn {k}")
            supervised[k] = (inside[0][0], inside[-1][1])
        else:
            a = len(head)
            supervised[k] = (a, a + len(full[a:end].rstrip()))
        if supervised[k][1] <= supervised[k][0]:
            raise TemplateError(f"{where}: assistant turn {k} renders as no text under the chat template "
                                f"({template.name})")

    if continue_final_message:
        supervised.pop(n - 1)  # the open turn is a prompt, not an answer
        cuts = set(bounds[:n]) | {len(heads[-1]), len(text)}
    else:
        cuts = set(bounds) | {len(text)}
    for a, b in supervised.values():
        cuts |= {a, b}
    cuts = sorted(c for c in cuts if c <= len(text))
    pattern, control_ids = _control_tokens(tokenizer)
    protected = []
    for k, message in enumerate(messages):
        found = _content_range(full, bounds[k], bounds[k + 1], message["content"], pattern)
        if found:
            protected.append(found)
    pieces = []
    for a, b in zip(cuts, cuts[1:]):
        if b <= a:
            continue
        turn = bisect.bisect_right(bounds, a) - 1  # the message whose text holds offset a (n: the new turn)
        role = messages[turn]["role"] if turn < n else "assistant"
        span = next((k for k, (p, q) in supervised.items() if p <= a and b <= q), None)
        pieces.append(Piece(text[a:b], turn, role, span, _units(text[a:b], a, protected, pattern, control_ids)))
    return Rendered(text, pieces, assistant)


class Continuation(str):
    """A text unit tokenized as the continuation of the text before it (see ``Tokenizer.encode_continuation``)
    rather than on its own."""


def tokenize_pieces(pieces: list[Piece], tokenizer, special_as_text: bool = True) -> None:
    """Fill each piece's ``ids``: its text chunks tokenized each on its own (batched calls), its control tokens
    as their ids.  Strings that look like special tokens inside text stay text (``special_as_text``)."""
    fresh = [u for p in pieces for u in p.units if isinstance(u, str) and not isinstance(u, Continuation)]
    continued = [u for p in pieces for u in p.units if isinstance(u, Continuation)]
    fresh_ids = iter(tokenizer.encode(fresh, special_as_text=special_as_text) if fresh else [])
    continued_ids = iter(tokenizer.encode_continuation(continued) if continued else [])
    for piece in pieces:
        piece.ids = []
        for unit in piece.units:
            if isinstance(unit, Continuation):
                piece.ids += next(continued_ids)
            elif isinstance(unit, str):
                piece.ids += next(fresh_ids)
            else:
                piece.ids.append(unit)


@dataclass
class RenderedPrompt:
    """A conversation rendered for generation: the text, and the token ids to feed the model (tokenized as
    training tokenized it: feed these, do not re-tokenize the text)."""

    text: str
    input_ids: list[int]


def render_prompt(messages: list, tokenizer, template: "ChatTemplate | str | None" = None, *,
                  continue_final_message: bool = False, where: str = "request") -> RenderedPrompt:
    """The prompt for the next assistant turn of ``messages`` (OpenAI-style dicts; content as a string or text
    parts; ShareGPT keys accepted), rendered with ``template`` (a :class:`ChatTemplate`, a ``--chat-template``
    value, or None: the tokenizer's own, else ``openelm``) exactly as training renders a conversation up to an
    assistant turn: same text, same ids.  ``continue_final_message``: continue a final assistant message instead
    of starting a new turn.  Bad messages raise :class:`DataError` (a ``ValueError``) naming ``where``."""
    from .formats import normalize_messages

    normalized = normalize_messages(list(messages), where)
    chosen = ChatTemplate.resolve(template, tokenizer)
    go_on = continue_final_message and normalized[-1]["role"] == "assistant"
    rendered = split_conversation(normalized, chosen, tokenizer, where=where, add_generation_prompt=not go_on,
                                  continue_final_message=go_on)
    tokenize_pieces(rendered.pieces, tokenizer)
    return RenderedPrompt(rendered.text, [i for p in rendered.pieces for i in p.ids])


def chat_template_for_adapter(metadata: dict, tokenizer, override: str | None = None) -> ChatTemplate:
    """The chat template to serve an adapter with: ``override`` (``--chat-template``), else the one saved in its
    ``elmtune.json`` (``metadata["chat_template"]``, written from :meth:`DataSpec.adapter_metadata`), else the
    default for its tokenizer (its own, else ``openelm`` — what an adapter trained before chat templates were
    saved was trained with, for one-turn alpaca records under ``openelm-sep``)."""
    if override:
        return ChatTemplate.resolve(override, tokenizer)
    saved = metadata.get("chat_template")
    if saved:
        try:
            return ChatTemplate.from_dict(saved)
        except (KeyError, TypeError, AttributeError):
            raise ValueError(f"the adapter's metadata has an unreadable chat_template {saved!r}: pass "
                             "--chat-template") from None
    return ChatTemplate.resolve(None, tokenizer)
