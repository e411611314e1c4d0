"""Conversations and the other new formats, on the real Llama-2 tokenizer: token-exactness (the decoded input_ids
are the rendered conversation, the decoded supervised tokens are the assistant turns with their end tokens, no
token crosses a role boundary, none is lost or doubled), the tutorial's alpaca record reproduced by a one-turn
conversation, templates with and without ``{% generation %}`` markers, truncation, and the inference renderer."""

from __future__ import annotations

import json
import shutil

import pytest

from elmtune.data import IGNORE_INDEX, ChatTemplate, DataError, DataSpec, render_prompt
from elmtune.data.chat import (CHATML_TEMPLATE, OPENELM_TEMPLATE, chat_template_for_adapter, split_conversation,
                               tokenize_pieces)
from elmtune.data.encode import EncodeStats, encode_records
from elmtune.data.formats import normalize_messages
from elmtune.data.records import Record
from elmtune.tokenizer import load_tokenizer
from tests.helpers import shared_path

#: Llama-2-chat's layout (system folded into the first user turn, content trimmed, bos before every [INST]).
LLAMA2_CHAT = (
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
    "{% set loop_messages = messages[1:] %}{% else %}{% set system = none %}{% set loop_messages = messages %}"
    "{% endif %}{% for message in loop_messages %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' }}"
    "{% if loop.first and system %}{{ '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' }}{% endif %}"
    "{{ message['content'] | trim + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' ' + message['content'] | trim + ' ' + eos_token }}{% endif %}{% endfor %}"
)
CHATML_MARKED = CHATML_TEMPLATE.replace(
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' -}}",
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}{%- if message['role'] == 'assistant' -%}{%- generation -%}"
    "{{- message['content'] + '<|im_end|>' -}}{%- endgeneration -%}{%- else -%}"
    "{{- message['content'] + '<|im_end|>' -}}{%- endif -%}{{- '\\n' -}}")
OPENELM_UNMARKED = OPENELM_TEMPLATE.replace("{%- generation -%}", "").replace("{%- endgeneration -%}", "")

CONVERSATIONS = [
    [{"role": "system", "content": "You are a concise assistant. Answer in the user's language."},
     {"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "Paris."},
     {"role": "user", "content": "请用中文再说一遍，并解释一下。"},
     {"role": "assistant", "content": "巴黎。它是法国的首都 🙂\n也是最大的城市。"},
     {"role": "user", "content": "  Indented\tline, a literal </s> and <s>, then café.  "},
     {"role": "assistant", "content": "Noted: </s> stays text.\n\n- one\n- two"}],
    [{"role": "user", "content": "s"}, {"role": "assistant", "content": "s"}],  # content inside "<s>"/"</s>"
    [{"role": "user", "content": "Translate: good morning"}, {"role": "assistant", "content": "Bonjour"}],
]
END_TOKEN = {"openelm": "</s>", "chatml": "<|im_end|>", "llama2-chat": "</s>"}


@pytest.fixture(scope="module")
def llama2_with_own_template(tmp_path_factory):
    """The same tokenizer, with a chat_template in its tokenizer_config.json."""
    directory = tmp_path_factory.mktemp("tok")
    source = shared_path("data", "llama2-tokenizer")
    for name in ("tokenizer.model", "special_tokens_map.json"):
        shutil.copy(source / name, directory / name)
    config = json.loads((source / "tokenizer_config.json").read_text())
    (directory / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": LLAMA2_CHAT}))
    return load_tokenizer(str(directory))


def templates(tok_with_own):
    return {"openelm": ChatTemplate.parse("openelm"), "chatml": ChatTemplate.parse("chatml"),
            "llama2-chat": ChatTemplate.resolve(None, tok_with_own)}


def exact_text(ids: list[int], tok) -> str:
    """The text ids stand for: each run of ordinary tokens decoded by SentencePiece (the exact inverse of its
    encoding of one string), each added token (bos, eos, unk) as its string."""
    control = {i: t.content for i, t in tok.hf.added_tokens_decoder.items()}
    out, run = [], []
    for i in ids + [None]:
        if i is None or i in control:
            out.append(tok.sentencepiece.decode(run))
            run = []
            if i is not None:
                out.append(control[i])
        else:
            run.append(i)
    return "".join(out)


def encode(tok, records, train_on="all-assistant", chat_template="auto", max_length=4096, fields="zh"):
    stats = EncodeStats()
    spec = DataSpec.parse("openelm-sep", fields, max_length, train_on=train_on, chat_template=chat_template)
    return encode_records([Record("f.jsonl", n, r) for n, r in enumerate(records)], tok, spec, stats), stats


def supervised_runs(example) -> list[list[int]]:
    runs, run = [], []
    for token, label in zip(example.input_ids, example.labels):
        if label != IGNORE_INDEX:
            assert label == token
            run.append(token)
        elif run:
            runs.append(run)
            run = []
    return runs + ([run] if run else [])


def check_token_exact(messages, template: ChatTemplate, tok, example, train_on):
    """The token-exactness rule, checked against transformers' public apply_chat_template."""
    rendered = tok.hf.apply_chat_template(messages, chat_template=template.source, tokenize=False)
    pieces = split_conversation(normalize_messages(messages, "t"), template, tok).pieces
    tokenize_pieces(pieces, tok)
    # none lost or doubled: the pieces are the rendering, and the example is the pieces' tokens
    assert "".join(p.text for p in pieces) == rendered
    assert [i for p in pieces for i in p.ids] == example.input_ids
    # the decoded input_ids are the rendered conversation, piece by piece (each piece tokenized exactly)
    assert "".join(exact_text(p.ids, tok) for p in pieces) == rendered
    for p in pieces:
        assert exact_text(p.ids, tok) == p.text
    # no token crosses a role boundary: turn boundaries (from rendering the growing conversation) fall between pieces
    bounds = {len(tok.hf.apply_chat_template(messages[:k], chat_template=template.source, tokenize=False))
              for k in range(1, len(messages))}
    offset = 0
    for p in pieces:
        assert not any(offset < b < offset + len(p.text) for b in bounds), (p.text, bounds)
        offset += len(p.text)
    # the decoded supervised tokens are the assistant turns' text with their end tokens
    if train_on == "all":
        assert example.labels == [IGNORE_INDEX] + example.input_ids[1:] if example.input_ids[0] == tok.bos_id \
            else example.labels == example.input_ids
        return
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    if template.name == "tokenizer":  # Llama-2-chat: " {content|trim} </s>"
        answers = [f" {a.strip()} " for a in answers]
    expected = [a + END_TOKEN[template.name if template.name != "tokenizer" else "llama2-chat"] for a in answers]
    if train_on == "last-turn":
        expected = expected[-1:]
    assert [exact_text(run, tok) for run in supervised_runs(example)] == expected


@pytest.mark.parametrize("train_on", ["all-assistant", "last-turn", "all"])
@pytest.mark.parametrize("name", ["openelm", "chatml", "llama2-chat"])
def test_messages_are_token_exact(llama2, llama2_with_own_template, name, train_on):
    tok = llama2_with_own_template if name == "llama2-chat" else llama2
    template = templates(llama2_with_own_template)[name]
    examples, stats = encode(tok, [{"messages": m} for m in CONVERSATIONS], train_on,
                             "auto" if name == "llama2-chat" else name)
    assert len(examples) == len(CONVERSATIONS) and stats.truncated == 0
    for messages, example in zip(CONVERSATIONS, examples):
        check_token_exact(messages, template, tok, example, train_on)
        assert [role for role, _, _ in example.turns] == [m["role"] for m in messages] or name == "llama2-chat"


def test_the_tokenizers_own_template_is_the_default_else_openelm(llama2, llama2_with_own_template):
    assert ChatTemplate.resolve(None, llama2) == ChatTemplate("openelm", OPENELM_TEMPLATE)
    assert ChatTemplate.resolve(None, llama2_with_own_template) == ChatTemplate("tokenizer", LLAMA2_CHAT)
    assert ChatTemplate.resolve("tokenizer", llama2_with_own_template).source == LLAMA2_CHAT
    with pytest.raises(ValueError, match="--chat-template tokenizer: the tokenizer in .* has no chat_template"):
        ChatTemplate.resolve("tokenizer", llama2)


def test_sharegpt_is_token_exact(llama2):
    sharegpt = [{"from": {"system": "system", "user": "human", "assistant": "gpt"}[m["role"]], "value": m["content"]}
                for m in CONVERSATIONS[0]]
    [example], _ = encode(llama2, [{"conversations": sharegpt}])
    check_token_exact(CONVERSATIONS[0], ChatTemplate.parse("openelm"), llama2, example, "all-assistant")
    [same], _ = encode(llama2, [{"messages": CONVERSATIONS[0]}])
    assert (example.input_ids, example.labels) == (same.input_ids, same.labels)


def test_the_openelm_template_renders_the_tutorial_convention(llama2):
    rendered = llama2.hf.apply_chat_template(CONVERSATIONS[0], chat_template=OPENELM_TEMPLATE, tokenize=False)
    assert rendered == ("<s>You are a concise assistant. Answer in the user's language.\n"
                        "What is the capital of France?<sep>Paris.</s>"
                        "请用中文再说一遍，并解释一下。<sep>巴黎。它是法国的首都 🙂\n也是最大的城市。</s>"
                        "  Indented\tline, a literal </s> and <s>, then café.  <sep>Noted: </s> stays text.\n\n- one\n"
                        "- two</s>")
    [example], _ = encode(llama2, [{"messages": CONVERSATIONS[0]}])
    assert example.input_ids.count(llama2.eos_id) == 3 and example.input_ids.count(llama2.bos_id) == 1


@pytest.mark.parametrize("fields", ["en", "zh"])
def test_a_one_turn_conversation_is_the_tutorials_alpaca_record(llama2, fields):
    """Real alpaca-chinese records (empty inputs, unicode, some cut at 384 tokens): the alpaca record under
    openelm-sep and the same content as a one-turn messages record give identical input_ids and labels."""
    records = json.loads((shared_path("data", "alpaca-chinese") / "alpaca_chinese_part_0.json").read_text("utf-8"))
    keys = {"en": ("en_instruction", "en_input", "en_output"), "zh": ("instruction", "input", "output")}[fields]
    records = [r for r in records if r[keys[2]].strip() and (r[keys[0]] + r[keys[1]]).strip()]  # no empty turns
    alpaca, alpaca_stats = encode(llama2, records, max_length=384, fields=fields)
    chat, chat_stats = encode(llama2, [{"messages": [{"role": "user", "content": r[keys[0]] + r[keys[1]]},
                                                     {"role": "assistant", "content": r[keys[2]]}]} for r in records],
                              max_length=384, fields=fields)
    assert sum(not r[keys[1]] for r in records) > 100 and alpaca_stats.truncated > 0  # the cases are there
    assert len(alpaca) == len(chat) == len(records)
    for a, c in zip(alpaca, chat):
        assert (a.input_ids, a.labels) == (c.input_ids, c.labels), a.index
    assert chat_stats.truncated == alpaca_stats.truncated


def test_alpaca_is_token_exact(llama2):
    record = {"instruction": "把这句话翻译成英文：", "input": "", "output": "Good morning! 🙂"}
    [example], _ = encode(llama2, [record])
    [answer] = supervised_runs(example)  # the prompt and the answer, each tokenized on its own (the tutorial's way)
    assert exact_text(example.input_ids[:-len(answer)], llama2) == "<s>" + record["instruction"] + "<sep>"
    assert exact_text(answer, llama2) == record["output"] + "</s>"


@pytest.mark.parametrize("prompt, completion", [("The capital of France is", " Paris."),
                                                ("2 + 2 =", "4"), ("", "无提示的补全。"),
                                                ("Q: café?\nA:", " 咖啡馆 🙂\n")])
def test_completion_is_token_exact(llama2, prompt, completion):
    [example], _ = encode(llama2, [{"prompt": prompt, "completion": completion}])
    ids = example.input_ids
    assert ids[0] == llama2.bos_id and ids[-1] == llama2.eos_id
    assert llama2.sentencepiece.decode(ids[1:-1]) == prompt + completion  # prompt and completion, joined
    [supervised] = supervised_runs(example)
    assert ids[:len(ids) - len(supervised)] == [llama2.bos_id] + (llama2.encode([prompt])[0] if prompt else [])
    body = supervised[:-1]
    assert supervised[-1] == llama2.eos_id
    if prompt:  # the completion continues the prompt: its ids decode to it after the prompt's
        assert llama2.sentencepiece.decode(ids[1:len(ids) - len(supervised)] + body).endswith(completion)
    else:
        assert llama2.sentencepiece.decode(body) == completion


def test_completion_matches_tokenizing_the_joined_text_when_it_starts_a_word(llama2):
    [example], _ = encode(llama2, [{"prompt": "The capital of France is", "completion": " Paris."}])
    assert example.input_ids == [llama2.bos_id] + llama2.encode(["The capital of France is Paris."])[0] + [
        llama2.eos_id]


def test_text_is_token_exact_and_all_supervised(llama2):
    text = "Domain text: 巴黎是法国的首都。\n\nSecond paragraph, with a literal </s> in it. 🙂"
    [example], _ = encode(llama2, [{"text": text}], train_on="last-turn")  # train_on does not apply to text
    assert exact_text(example.input_ids, llama2) == "<s>" + text + "</s>"
    assert example.labels == [IGNORE_INDEX] + example.input_ids[1:]  # everything but bos


@pytest.mark.parametrize("marked, unmarked", [(OPENELM_TEMPLATE, OPENELM_UNMARKED), (CHATML_MARKED, CHATML_TEMPLATE)])
@pytest.mark.parametrize("train_on", ["all-assistant", "last-turn", "all"])
def test_generation_markers_and_none_give_the_same_supervision(llama2, marked, unmarked, train_on):
    assert ChatTemplate("m", marked).has_generation_markers and not ChatTemplate("u", unmarked).has_generation_markers
    records = [{"messages": m} for m in CONVERSATIONS]
    with_markers, _ = encode(llama2, records, train_on, marked)
    without, _ = encode(llama2, records, train_on, unmarked)
    assert [(e.input_ids, e.labels) for e in with_markers] == [(e.input_ids, e.labels) for e in without]
    assert all(any(label != IGNORE_INDEX for label in e.labels) for e in without)


def test_token_ids_never_depend_on_train_on(llama2):
    ids = {train_on: [e.input_ids for e in encode(llama2, [{"messages": m} for m in CONVERSATIONS], train_on)[0]]
           for train_on in ("all-assistant", "last-turn", "all")}
    assert ids["all-assistant"] == ids["last-turn"] == ids["all"]


# --- truncation ---------------------------------------------------------------------------------------------------

def turn_end(example, n):
    return example.turns[n][2]


def test_truncation_keeps_whole_early_turns(llama2):
    messages = CONVERSATIONS[0]
    [full], _ = encode(llama2, [{"messages": messages}])
    # room for everything but the last exchange: the first two exchanges stay whole, the rest goes
    limit = turn_end(full, 5) + 3
    [cut], stats = encode(llama2, [{"messages": messages}], max_length=limit)
    assert cut.input_ids == full.input_ids[:turn_end(full, 4)] and cut.labels == full.labels[:turn_end(full, 4)]
    assert stats.truncated == 1 and [role for role, _, _ in cut.turns] == [m["role"] for m in messages[:5]]
    assert exact_text(supervised_runs(cut)[-1], llama2) == messages[4]["content"] + "</s>"


def test_truncation_inside_the_first_answer_cuts_like_the_tutorial(llama2):
    [full], _ = encode(llama2, [{"messages": CONVERSATIONS[0]}])
    limit = turn_end(full, 1) + 2  # the first answer does not fit whole
    [cut], stats = encode(llama2, [{"messages": CONVERSATIONS[0]}], max_length=limit)
    assert cut.input_ids == full.input_ids[:limit] and stats.truncated == 1
    assert sum(label != IGNORE_INDEX for label in cut.labels) == 2


def test_a_conversation_is_dropped_only_when_nothing_supervised_remains(llama2):
    [full], _ = encode(llama2, [{"messages": CONVERSATIONS[0]}])
    examples, stats = encode(llama2, [{"messages": CONVERSATIONS[0]}], max_length=turn_end(full, 1))
    assert examples == [] and stats.dropped_all_masked == 1 and stats.formats["messages"].dropped_all_masked == 1
    # last-turn: the one supervised turn is cut away, so the conversation goes (counted) ...
    examples, stats = encode(llama2, [{"messages": CONVERSATIONS[0]}], "last-turn", max_length=turn_end(full, 5))
    assert examples == [] and stats.dropped_all_masked == 1
    # ... while all-assistant keeps its whole first two exchanges
    [kept], _ = encode(llama2, [{"messages": CONVERSATIONS[0]}], max_length=turn_end(full, 5))
    assert len(kept.input_ids) == turn_end(full, 4)


# --- templates ----------------------------------------------------------------------------------------------------

def test_chat_template_values(tmp_path):
    assert ChatTemplate.parse("auto") is None
    assert ChatTemplate.parse("chatml").source == CHATML_TEMPLATE
    path = tmp_path / "t.jinja"
    path.write_text(CHATML_MARKED)
    assert ChatTemplate.parse(str(path)) == ChatTemplate(f"file:{path}", CHATML_MARKED)
    assert ChatTemplate.parse("{{ messages[0]['content'] }}").name == "custom"
    with pytest.raises(ValueError, match="--chat-template 'nope': not a template name"):
        ChatTemplate.parse("nope")
    with pytest.raises(ValueError, match="Jinja syntax error at line 1"):
        ChatTemplate.parse("{% for m in messages %}{{ m.content }}")


def test_a_template_that_refuses_a_conversation_names_the_record(llama2):
    template = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}" \
               + CHATML_TEMPLATE
    with pytest.raises(DataError, match=r"f.jsonl: record 0: the chat template \(custom\) refuses this conversation: "
                                        "no system role"):
        encode(llama2, [{"messages": CONVERSATIONS[0]}], chat_template=template)


def test_a_template_that_rewrites_earlier_turns_is_refused(llama2):
    template = "{% for m in messages %}{% if loop.last %}[LAST]{% endif %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(DataError, match=r"record 0: the chat template \(custom\) renders turn 0 differently"):
        encode(llama2, [{"messages": CONVERSATIONS[2]}], chat_template=template)


# --- the inference renderer ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["openelm", "chatml", "llama2-chat"])
def test_render_prompt_gives_exactly_what_training_put_before_each_answer(llama2, llama2_with_own_template, name):
    tok = llama2_with_own_template if name == "llama2-chat" else llama2
    template = templates(llama2_with_own_template)[name]
    messages = CONVERSATIONS[0]
    [example], _ = encode(tok, [{"messages": messages}], chat_template="auto" if name == "llama2-chat" else name)
    starts = [n for n, label in enumerate(example.labels)
              if label != IGNORE_INDEX and (n == 0 or example.labels[n - 1] == IGNORE_INDEX)]
    for k, start in zip([k for k, m in enumerate(messages) if m["role"] == "assistant"], starts):
        prompt = render_prompt(messages[:k], tok, template)
        assert prompt.input_ids == example.input_ids[:start]
        assert prompt.text == tok.hf.apply_chat_template(messages[:k], chat_template=template.source,
                                                         add_generation_prompt=True, tokenize=False)


def test_render_prompt_continues_a_final_assistant_message(llama2):
    messages = [*CONVERSATIONS[2][:1], {"role": "assistant", "content": "Bon"}]
    prompt = render_prompt(messages, llama2, "openelm", continue_final_message=True)
    assert prompt.text == "<s>Translate: good morning<sep>Bon" and prompt.input_ids[-1] != llama2.eos_id
    assert prompt.input_ids[:-1] == render_prompt(messages[:1], llama2).input_ids


def test_render_prompt_takes_openai_messages_and_refuses_bad_ones(llama2):
    parts = [{"role": "user", "content": [{"type": "text", "text": "Translate: good morning"}]}]
    assert render_prompt(parts, llama2).input_ids == render_prompt(CONVERSATIONS[2][:1], llama2).input_ids
    with pytest.raises(DataError, match="request: field 'messages\\[0\\].role': unknown role 'robot'"):
        render_prompt([{"role": "robot", "content": "x"}], llama2)


def test_adapter_metadata_carries_the_template_itself(llama2, llama2_with_own_template):
    spec = DataSpec.parse("openelm-sep", "zh", 64, train_on="last-turn")
    stats = EncodeStats()
    encode_records([Record("chat.jsonl", 0, {"messages": CONVERSATIONS[2]}), Record("text.jsonl", 0, {"text": "x"})],
                   llama2, spec, stats)
    saved = json.loads(json.dumps(spec.adapter_metadata(llama2, stats)))  # as elmtune.json holds it
    assert saved == {"format": "auto", "formats": {"messages": 1, "text": 1}, "train_on": "last-turn",
                     "chat_template": {"name": "openelm", "source": OPENELM_TEMPLATE}}
    assert chat_template_for_adapter(saved, llama2_with_own_template) == ChatTemplate("openelm", OPENELM_TEMPLATE)
    assert chat_template_for_adapter(saved, llama2, override="chatml").name == "chatml"
    assert chat_template_for_adapter({}, llama2).name == "openelm"  # an adapter from before chat templates
    assert chat_template_for_adapter({}, llama2_with_own_template).source == LLAMA2_CHAT


def test_prefix_rendering_falls_back_to_the_public_renderer(llama2, monkeypatch):
    """The growing conversations are rendered by transformers' compiled template directly (faster); without it
    (a transformers that moved it) the public renderer gives the same examples."""
    import elmtune.data.chat as chat

    records = [{"messages": m} for m in CONVERSATIONS]
    expected = [(e.input_ids, e.labels) for e in encode(llama2, records, chat_template="chatml")[0]]
    assert chat._compiled(CHATML_TEMPLATE) is not None
    monkeypatch.setattr(chat, "_compiled", lambda source: None)
    assert [(e.input_ids, e.labels) for e in encode(llama2, records, chat_template="chatml")[0]] == expected
