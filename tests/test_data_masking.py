"""Masking against an independent layout: for every named template and every tiny family, a reply trains exactly
what the model generates after the inference prompt (the reply and its end of turn), never header tokens, even
when the reply is a letter of the header, a role name, special-token text or the system prompt."""

from __future__ import annotations

import pytest
from tiny import FAMILIES

from tunelab.data.encode import IGNORE, encode_conversation, render_conversation
from tunelab.data.templates import ChatTemplate, get_template, resolve_template, template_names
from tunelab.data.types import Conversation, Message

SENTINEL = "SENTINEL-REPLY-7f3a"
USER1, USER2 = "What is the answer?", "And then?"
SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
ROLES = ("assistant", "user", "system", "model", "tool", "gpt", "human", "ASSISTANT", "Assistant", "USER")


def conversation(reply: str, turns: int, system: str | None) -> Conversation:
    messages = [Message("system", system)] if system else []
    messages += [Message("user", USER1), Message("assistant", reply)]
    if turns == 2:
        messages += [Message("user", USER2), Message("assistant", reply)]
    return Conversation(messages, source="test#0")


def tricky_replies(template: ChatTemplate, system: str | None) -> list[str]:
    """1-3 character pieces of the text around the reply, its words, role names, special tokens, system text."""
    text = template.render(conversation(SENTINEL, 2, system).to_template_messages())
    around = [*template.headers, *template.stop_strings, *template.special_tokens.values()]
    pieces = {c for c in text if not c.isspace()}
    for s in around:
        pieces.update(s[i:i + n] for n in (2, 3) for i in range(len(s) - n + 1))
    pieces.update(text.split())
    pieces.update(line.strip() for line in text.splitlines())
    pieces.update([*ROLES, *around, SYSTEM])
    return sorted(p for p in pieces if p and p == p.strip() and SENTINEL not in p)


def _stop_end(after: str, template: ChatTemplate) -> int | None:
    """End of the first end-of-turn string in the text that follows a reply."""
    ends = [j + len(s) for s in template.stop_strings if (j := after.find(s)) >= 0]
    return min(ends) if ends else None


def expected_spans(template: ChatTemplate, reply: str, turns: int, system: str | None) -> list[tuple[int, int]]:
    """Where each reply's training span must be, derived without searching for the reply: the reply's place from a
    rendering with a sentinel reply, its start from the inference prompt of that turn (what the template adds after
    the generation prompt, e.g. an empty <think> block, is learned), its end after the first end-of-turn string."""
    layout = template.render(conversation(SENTINEL, turns, system).to_template_messages()).split(SENTINEL)
    assert len(layout) == turns + 1, "the sentinel appears once per reply"
    messages = conversation(reply, turns, system).to_template_messages()
    replies = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    spans, base = [], 0
    for k in range(turns):
        base += len(layout[k])
        before = reply.join(layout[:k + 1])  # the real text up to this reply
        prompt = template.render(messages[:replies[k]], add_generation_prompt=True)
        start = len(prompt) if before.startswith(prompt) else base
        stop = _stop_end(layout[k + 1], template)
        spans.append((start, base + len(reply) + (stop or 0)))
        base += len(reply)
    return spans


def check_template(template: ChatTemplate, system: str | None) -> list[str]:
    failures = []
    for reply in tricky_replies(template, system):
        for turns in (1, 2):
            conv = conversation(reply, turns, system)
            layout = template.render(conversation(SENTINEL, turns, system).to_template_messages()).split(SENTINEL)
            if template.render(conv.to_template_messages()) != reply.join(layout):
                continue  # the template rewrites this reply (Qwen3 drops "</think>"): refused, tested elsewhere
            rendered = render_conversation(conv, template, "all_assistant")
            want = expected_spans(template, reply, turns, system)
            if rendered.spans != want:
                got = [rendered.text[a:b] for a, b in rendered.spans]
                failures.append(f"{template.name} reply {reply!r} ({turns} turns): trained {got}, expected "
                                f"{[rendered.text[a:b] for a, b in want]}")
    return failures


@pytest.mark.parametrize("name", template_names())
@pytest.mark.parametrize("system", [None, SYSTEM])
def test_named_templates_train_only_the_reply_and_its_end(name, system):
    template = get_template(name)
    failures = check_template(template, system)
    assert not failures, f"{len(failures)} wrong spans, e.g.:\n" + "\n".join(failures[:5])


def _accepts_system(template: ChatTemplate) -> bool:
    import jinja2

    try:
        template.render(conversation("x", 1, SYSTEM).to_template_messages())
    except jinja2.TemplateError:
        return False
    return True


@pytest.fixture(scope="module")
def family_tokenizers(tiny_models):
    from transformers import AutoTokenizer

    return {family: AutoTokenizer.from_pretrained(tiny_models[family]) for family in sorted(FAMILIES)}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_template_trains_no_header_token(family, family_tokenizers):
    tokenizer = family_tokenizers[family]
    template = resolve_template("auto", tokenizer)
    system = SYSTEM if _accepts_system(template) else None  # the official Mistral v0.3 template refuses one
    failures = check_template(template, system) + check_template(template, None)
    assert not failures, f"{len(failures)} wrong spans, e.g.:\n" + "\n".join(failures[:5])
    # and at token level: the header's tokens never carry loss
    header = template.headers[1].strip() or template.headers[0].strip()
    for reply in ("a", "d", "t", "assistant", "model", header):
        example = encode_conversation(conversation(reply, 2, system), template, tokenizer, 4096)
        trained = tokenizer.decode([t for t, lab in zip(example["input_ids"], example["labels"]) if lab != IGNORE])
        assert trained.count(header) == 2 * (reply == header), (family, reply, trained)


def test_smollm2_reply_assistant_trains_only_itself():
    """The issue's case: SmolLM2's own template, reply "assistant"."""
    from tiny import base_tokenizer_path
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_tokenizer_path())
    template = resolve_template("auto", tokenizer)
    example = encode_conversation(conversation("assistant", 1, None), template, tokenizer, 512)
    trained = [t for t, lab in zip(example["input_ids"], example["labels"]) if lab != IGNORE]
    assert tokenizer.decode(trained) == "assistant<|im_end|>"
    assert not check_template(template, None)
