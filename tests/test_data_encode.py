"""Encoding and masking: exactly the replies and their end-of-turn tokens are trained, for any template."""

from __future__ import annotations

import pytest

from tunelab.data.encode import EncodeError, EncodeSettings, encode_batch, encode_conversation, render_conversation
from tunelab.data.templates import resolve_template
from tunelab.data.types import Conversation, Message

IGNORE = -100


def trained_text(example, tokenizer) -> list[str]:
    """The decoded runs of trained tokens."""
    runs, current = [], []
    for token, label in zip(example["input_ids"], example["labels"]):
        if label != IGNORE:
            assert label == token
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    if current:
        runs.append(tokenizer.decode(current))
    return runs


def chat(*turns: str, system: str | None = None) -> Conversation:
    messages = [Message("system", system)] if system else []
    for i, text in enumerate(turns):
        messages.append(Message("user" if i % 2 == 0 else "assistant", text))
    return Conversation(messages, source="test#0")


MULTI = chat("Hi 你好", "Hello! 我是助手。", "Reverse: a b c", "c b a")
END = {"llama": "<|eot_id|>", "qwen2": "<|im_end|>", "qwen3": "<|im_end|>", "mistral": "</s>",
       "gemma": "<end_of_turn>"}


def test_every_assistant_turn_and_its_end_of_turn_are_trained(any_family, tokenizers):
    family, _ = any_family
    tokenizer = tokenizers[family]
    example = encode_conversation(MULTI, resolve_template("auto", tokenizer), tokenizer, 512, "all_assistant")
    runs = trained_text(example, tokenizer)
    prefix = "<think>\n\n</think>\n\n" if family == "qwen3" else ""  # Qwen3 (thinking on) writes an empty block
    assert runs == [f"Hello! 我是助手。{END[family]}", f"{prefix}c b a{END[family]}"]
    assert example["input_ids"].count(tokenizer.convert_tokens_to_ids(END[family])) >= 2


def test_encoded_ids_are_the_templates_tokens(tokenizers):
    tokenizer = tokenizers["llama"]
    example = encode_conversation(MULTI, resolve_template("auto", tokenizer), tokenizer, 512, "all_assistant")
    expected = tokenizer.apply_chat_template([m.to_template_dict() for m in MULTI.messages], tokenize=True,
                                             return_dict=True)["input_ids"]
    assert example["input_ids"] == expected


def test_last_assistant_everything_and_per_message_flags(tokenizers):
    tokenizer = tokenizers["qwen2"]
    template = resolve_template("auto", tokenizer)
    last = encode_conversation(MULTI, template, tokenizer, 512, "last_assistant")
    assert trained_text(last, tokenizer) == ["c b a<|im_end|>"]
    everything = encode_conversation(MULTI, template, tokenizer, 512, "everything")
    assert all(label != IGNORE for label in everything["labels"])
    flagged = chat("q1", "a1", "q2", "a2", "q3", "a3")
    flagged.messages[1].train = False  # skip a bad earlier reply
    flagged.messages[2].train = True  # and learn this user turn
    runs = trained_text(encode_conversation(flagged, template, tokenizer, 512, "all_assistant"), tokenizer)
    assert runs == ["q2", "a2<|im_end|>", "a3<|im_end|>"]


def test_pad_equal_to_eos_still_trains_the_eos(tokenizers, tiny_models):
    """SmolLM2 ships pad == eos == <|im_end|>: labels never depend on the pad id, so the stop token is learned."""
    from transformers import AutoTokenizer

    from tunelab.data.collate import padding_collator

    tokenizer = AutoTokenizer.from_pretrained(tiny_models["qwen2"])
    tokenizer.pad_token = tokenizer.eos_token
    template = resolve_template("auto", tokenizer)
    short, long = (encode_conversation(chat("hi", "yo"), template, tokenizer, 512, "all_assistant"),
                   encode_conversation(MULTI, template, tokenizer, 512, "all_assistant"))
    batch = padding_collator(tokenizer)([short, long])
    eos = tokenizer.eos_token_id
    assert eos == tokenizer.pad_token_id
    assert (batch["labels"][0] == eos).sum() == 1  # its own end of turn, not the padding
    assert (batch["labels"][1] == eos).sum() == 2
    assert batch["attention_mask"][0].sum() == len(short["input_ids"])


def test_mistral_trains_the_eos_after_each_reply(tokenizers):
    tokenizer = tokenizers["mistral"]
    example = encode_conversation(chat("Hi", "Hello", "Again?", "Yes"), resolve_template("auto", tokenizer),
                                  tokenizer, 512, "all_assistant")
    assert trained_text(example, tokenizer) == ["Hello</s>", "Yes</s>"]


@pytest.mark.parametrize("name", ["qwen", "qwen3"])
def test_tool_calls_are_trained_and_tool_results_are_not(tokenizers, name):
    tokenizer = tokenizers["qwen3"]
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "北京"}}}
    conv = Conversation([Message("user", "北京天气？"), Message("assistant", "", tool_calls=[call]),
                         Message("tool", '{"temp": 20}'), Message("assistant", "20度。")], tools=tools)
    thinking = False if name == "qwen3" else None
    example = encode_conversation(conv, resolve_template(name, tokenizer, enable_thinking=thinking), tokenizer, 1024,
                                  "all_assistant")
    runs = trained_text(example, tokenizer)
    assert runs[0] == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "北京"}}\n</tool_call><|im_end|>'
    assert runs[1] == "20度。<|im_end|>"
    assert len(runs) == 2 and not any("temp" in r or "get_weather\", \"parameters" in r for r in runs)


def test_qwen3_thinking_off_keeps_the_empty_block_in_the_prompt(tokenizers):
    tokenizer = tokenizers["qwen3"]
    conv = chat("q1", "<think>\nplan\n</think>\n\na1", "q2", "a2")
    off = encode_conversation(conv, resolve_template("qwen3", tokenizer, enable_thinking=False), tokenizer, 512,
                              "all_assistant")
    assert trained_text(off, tokenizer) == ["a1<|im_end|>", "a2<|im_end|>"]  # history reasoning dropped by Qwen3
    on = encode_conversation(conv, resolve_template("qwen3", tokenizer), tokenizer, 512, "all_assistant")
    assert trained_text(on, tokenizer)[-1] == "<think>\n\n</think>\n\na2<|im_end|>"


@pytest.mark.parametrize("name, trained", [
    ("chatglm3", ["\n yes</s>"]),  # no end-of-turn token after the last reply: eos appended and trained
    ("vicuna", [" yes</s>"]),
    ("alpaca", ["yes</s>"]),
    ("gemma", ["yes<end_of_turn>"]),
    ("phi3", ["yes<|end|>"]),
])
def test_named_templates_mask_the_prompt(tokenizers, name, trained):
    tokenizer = tokenizers["mistral"]  # eos </s>
    example = encode_conversation(chat("is it?", "yes"), resolve_template(name, tokenizer), tokenizer, 512,
                                  "all_assistant")
    assert trained_text(example, tokenizer) == trained


def test_plain_text_is_trained_in_full_with_eos(tokenizers):
    tokenizer = tokenizers["llama"]
    example = encode_conversation(Conversation([], text="长文本 document."), resolve_template("auto", tokenizer),
                                  tokenizer, 512, "all_assistant")
    assert example["input_ids"][-1] == tokenizer.eos_token_id
    assert example["labels"] == example["input_ids"]  # this tokenizer adds no bos to plain text
    assert tokenizer.decode(example["input_ids"]) == "长文本 document.<|eot_id|>"


def test_truncation_and_examples_with_nothing_to_train(tokenizers):
    tokenizer = tokenizers["qwen2"]
    template = resolve_template("auto", tokenizer)
    long_prompt = chat("word " * 200, "short answer")
    results, stats = encode_batch([long_prompt, MULTI], template, tokenizer, EncodeSettings(64, "all_assistant"))
    assert results[0] is None and stats.dropped_no_trainable == 1  # the reply lies beyond the cutoff
    assert len(results[1]["input_ids"]) <= 64
    assert stats.truncated == 2 and stats.examples == 1


def test_batch_equals_one_by_one_and_collects_rejects(tokenizers):
    tokenizer = tokenizers["mistral"]
    template = resolve_template("auto", tokenizer)  # the official template refuses system messages
    convs = [c for _ in range(700) for c in (chat("a", "b"), chat("c", "d", system="sys"), chat("e", "f", "g", "h"))]
    for i, conv in enumerate(convs):
        conv.source = f"f.json:{i + 1}"
    results, stats = encode_batch(convs, template, tokenizer, EncodeSettings(512, "all_assistant"))
    assert len(results) == len(convs) and stats.examples == 1400
    assert len(stats.rejects) == 700 and stats.rejects[0].source == "f.json:2"
    assert "refused" in stats.rejects[0].reason and stats.rejects[0].rule == "template"
    assert results[2] == encode_conversation(convs[2], template, tokenizer, 512, "all_assistant")


def test_tool_calls_with_a_template_that_cannot_render_them_are_refused(tokenizers):
    tokenizer = tokenizers["llama"]
    call = {"type": "function", "function": {"name": "f", "arguments": {}}}
    conv = Conversation([Message("user", "x"), Message("assistant", "", tool_calls=[call])])
    with pytest.raises(EncodeError, match="does not render tool calls"):
        render_conversation(conv, resolve_template("auto", tokenizer))


def test_reply_the_template_rewrites_is_reported():
    from tunelab.data.templates import ChatTemplate

    shouting = ChatTemplate("shout", "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | upper }}"
                                     "<|im_end|>\n{% endfor %}", ("<|im_end|>",))
    with pytest.raises(EncodeError, match="assistant message 1 does not appear"):
        render_conversation(chat("hi", "hello"), shouting)


def test_reply_repeating_the_prompt_is_found_in_the_right_place(tokenizers):
    tokenizer = tokenizers["qwen2"]
    example = encode_conversation(chat("Say: hello", "hello"), resolve_template("auto", tokenizer), tokenizer, 512,
                                  "all_assistant")
    assert trained_text(example, tokenizer) == ["hello<|im_end|>"]


def test_tool_call_the_template_drops_is_reported():
    from tunelab.data.templates import ChatTemplate

    # renders tool calls only when content is None (as DeepSeek-R1's template does); ours is "" -> dropped
    picky = ChatTemplate("picky", "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}"
                                  "{% if m['tool_calls'] and m['content'] is none %}CALL{% endif %}</s>{% endfor %}",
                         ("</s>",))
    call = {"type": "function", "function": {"name": "lookup", "arguments": {}}}
    conv = Conversation([Message("user", "x"), Message("assistant", "", tool_calls=[call])])
    with pytest.raises(EncodeError, match="did not render its tool call 'lookup'"):
        render_conversation(conv, picky)


def test_tokenizers_without_offsets_are_encoded_piece_by_piece(tokenizers, monkeypatch):
    """Slow (Python) tokenizers have no offset mapping: the text is tokenized in pieces at span boundaries."""
    from tunelab.data import encode

    tokenizer = tokenizers["qwen2"]
    template = resolve_template("auto", tokenizer)
    fast = encode_conversation(MULTI, template, tokenizer, 512, "all_assistant")
    monkeypatch.setattr(encode, "_backend", lambda tok: None)
    slow, _ = encode_batch([MULTI], template, tokenizer, EncodeSettings(512, "all_assistant"))
    assert slow[0] == fast
