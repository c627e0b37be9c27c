"""Chat templates: named templates render what the official ones render, token for token; registry behaviour."""

from __future__ import annotations

from pathlib import Path

import pytest

from tunelab.data.templates import (
    ChatTemplate,
    apply_template,
    get_template,
    register_template,
    resolve_template,
    template_names,
)
from tunelab.errors import TunelabError

OFFICIAL = Path(__file__).parent / "data" / "templates"
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "查询天气",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]
SYS = {"role": "system", "content": "You are a helpful assistant."}
CONVERSATIONS = {
    "single": [{"role": "user", "content": "What is the capital of France?"},
               {"role": "assistant", "content": "The capital of France is Paris."}],
    "multi": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
              {"role": "user", "content": "  Who are you? "},
              {"role": "assistant", "content": " I am an assistant.\n"}],
    "chinese": [{"role": "user", "content": "把这些词倒过来排列：苹果 香蕉 橙子"},
                {"role": "assistant", "content": "橙子 香蕉 苹果"}, {"role": "user", "content": "谢谢！"}],
    "tools": [{"role": "user", "content": "北京天气怎么样？"},
              {"role": "assistant", "content": "", "tool_calls": [
                  {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "北京"}}}]},
              {"role": "tool", "content": '{"temp": 20}'}, {"role": "tool", "content": '{"wind": "north"}'},
              {"role": "assistant", "content": "It is 20 degrees."}],
    "tools_text": [{"role": "user", "content": "Weather in Paris and Rome?"},
                   {"role": "assistant", "content": "Let me check.", "tool_calls": [
                       {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
                       {"name": "get_weather", "arguments": '{"city": "Rome"}'}]},
                   {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "Both sunny."}],
    "reasoning": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "<think>\nr1\n</think>\n\na1"},
                  {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2", "reasoning_content": "r2"},
                  {"role": "user", "content": "<tool_response>x</tool_response>"},
                  {"role": "assistant", "content": "a3"}],
}


def official(name: str) -> ChatTemplate:
    """An official template file, rendered by our (transformers-compatible) Jinja environment."""
    return ChatTemplate(name, (OFFICIAL / name).read_text(encoding="utf-8"), (),
                        {"bos_token": "<s>", "eos_token": "</s>"})


def renders_equal(ours: ChatTemplate, reference: ChatTemplate, messages, **kwargs) -> None:
    for generation in (False, True):
        expected = reference.render(messages, add_generation_prompt=generation, **kwargs)
        assert ours.render(messages, add_generation_prompt=generation, **kwargs) == expected


@pytest.mark.parametrize("with_system", [False, True])
@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
def test_qwen_matches_official_qwen25(conversation, with_system):
    messages = ([SYS] if with_system else []) + CONVERSATIONS[conversation]
    ours = get_template("qwen")
    for tools in (None, TOOLS):
        renders_equal(ours, official("qwen2.5.jinja"), messages, tools=tools)


@pytest.mark.parametrize("with_system", [False, True])
@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
def test_qwen3_matches_official_in_both_thinking_modes(conversation, with_system):
    messages = ([SYS] if with_system else []) + CONVERSATIONS[conversation]
    for tools in (None, TOOLS):
        for thinking in ({}, {"enable_thinking": True}, {"enable_thinking": False}):
            renders_equal(get_template("qwen3"), official("qwen3.jinja"), messages, tools=tools, **thinking)


def test_qwen3_explicit_thinking_is_baked_into_the_saved_template(tiny_models):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_models["qwen3"])
    messages = [{"role": "user", "content": "hi"}]
    off = resolve_template("qwen3", tokenizer, enable_thinking=False)
    assert off.render(messages, add_generation_prompt=True).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    apply_template(tokenizer, off)  # what export/serving later read: no enable_thinking passed, still off
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<think>\n\n</think>\n\n")
    on = resolve_template("qwen3", tokenizer, enable_thinking=True)
    assert on.render(messages, add_generation_prompt=True).endswith("<|im_start|>assistant\n")
    assert off.render(messages, add_generation_prompt=True, enable_thinking=True).endswith("assistant\n")


@pytest.mark.parametrize("conversation", ["single", "multi", "chinese"])
def test_mistral_matches_official_v03(conversation):
    renders_equal(get_template("mistral"), official("mistral-v0.3.jinja"), CONVERSATIONS[conversation])


def test_mistral_puts_system_before_the_last_user_turn():
    text = get_template("mistral").render([SYS] + CONVERSATIONS["multi"][:3])
    assert text == "<s>[INST] Hi [/INST]Hello!</s>[INST] You are a helpful assistant.\n\n  Who are you?  [/INST]"


# Llama 3 and Gemma templates may not be redistributed: compare with their documented renderings.
def test_llama3_documented_rendering():
    text = get_template("llama3").render([SYS] + CONVERSATIONS["multi"], add_generation_prompt=True)
    assert text == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are a helpful assistant.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWho are you?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nI am an assistant.<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_gemma_documented_rendering():
    text = get_template("gemma").render(CONVERSATIONS["multi"][:3], add_generation_prompt=True)
    assert text == ("<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"
                    "<start_of_turn>user\nWho are you?<end_of_turn>\n<start_of_turn>model\n")
    with_system = get_template("gemma").render([SYS] + CONVERSATIONS["single"])
    assert with_system.startswith("<bos><start_of_turn>user\nYou are a helpful assistant.\n\nWhat is the capital")
    with pytest.raises(Exception, match="alternate"):
        get_template("gemma").render([{"role": "assistant", "content": "x"}])


DOCUMENTED = {
    "chatml": "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n"
              "<|im_start|>user\nV<|im_end|>\n<|im_start|>assistant\n",
    "internlm2": "<s><|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\nA"
                 "<|im_end|>\n<|im_start|>user\nV<|im_end|>\n<|im_start|>assistant\n",
    "chatglm3": "[gMASK]sop<|system|>\n S<|user|>\n U<|assistant|>\n A<|user|>\n V<|assistant|>",
    "vicuna": "S USER: U ASSISTANT: A</s>USER: V ASSISTANT:",
    "phi3": "<|system|>\nS<|end|>\n<|user|>\nU<|end|>\n<|assistant|>\nA<|end|>\n<|user|>\nV<|end|>\n<|assistant|>\n",
    "alpaca": "S\n\n### Instruction:\nU\n\n### Response:\nA</s>\n\n### Instruction:\nV\n\n### Response:\n",
}


@pytest.mark.parametrize("name", sorted(DOCUMENTED))
def test_documented_renderings(name):
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
                {"role": "assistant", "content": "A"}, {"role": "user", "content": "V"}]
    assert get_template(name).render(messages, add_generation_prompt=True) == DOCUMENTED[name]


def test_default_system_prompts():
    user = [{"role": "user", "content": "U"}]
    assert get_template("qwen").render(user).startswith(
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>")
    assert get_template("default").render(user).startswith("A chat between a curious user and an artificial")
    assert get_template("alpaca").render(user).startswith("Below is an instruction that describes a task.")


def test_auto_renders_exactly_like_transformers(any_family):
    """Our Jinja environment = transformers': the tokenizer's own template renders to the same text and tokens."""
    from transformers import AutoTokenizer

    family, path = any_family
    tokenizer = AutoTokenizer.from_pretrained(path)
    template = resolve_template("auto", tokenizer)
    messages = CONVERSATIONS["multi"] if family != "qwen3" else CONVERSATIONS["reasoning"][:4]
    for generation in (False, True):
        ours = template.render(messages, add_generation_prompt=generation)
        theirs = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
        assert ours == theirs
        assert tokenizer(ours, add_special_tokens=False)["input_ids"] == tokenizer.apply_chat_template(
            messages, tokenize=True, add_generation_prompt=generation, return_dict=True)["input_ids"]


def test_auto_probes_end_of_turn_and_headers(tiny_models):
    from transformers import AutoTokenizer

    expected = {"llama": "<|eot_id|>", "qwen2": "<|im_end|>", "mistral": "</s>", "gemma": "<end_of_turn>"}
    for family, stop in expected.items():
        template = resolve_template("auto", AutoTokenizer.from_pretrained(tiny_models[family]))
        assert template.stop_strings[0] == stop
    gemma = resolve_template("auto", AutoTokenizer.from_pretrained(tiny_models["gemma"]))
    assert gemma.headers == ("<start_of_turn>model\n", "<start_of_turn>model\n")


def test_auto_without_tokenizer_template_is_chatml(tiny_models):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_models["llama"])
    tokenizer.chat_template = None
    assert resolve_template("auto", tokenizer).name == "chatml"


def test_registry_known_names_aliases_and_duplicates(tmp_path):
    names = template_names()
    for required in ("alpaca", "chatml", "qwen", "qwen3", "llama3", "mistral", "gemma", "chatglm3", "vicuna"):
        assert required in names
    assert get_template("default").name == "vicuna"
    with pytest.raises(TunelabError, match="unknown chat template 'nope'.*chatml.*qwen3"):
        get_template("nope")
    with pytest.raises(ValueError, match="already registered"):
        register_template("chatml", "{{ messages }}")
    register_template("test-echo", "{% for m in messages %}{{ m['content'] }}|{% endfor %}", stop_strings=("|",))
    assert get_template("test-echo").render([{"role": "user", "content": "hi"}]) == "hi|"
    with pytest.raises(ValueError, match="already registered"):
        register_template("test-echo", "x")


def test_jinja_file_path_and_syntax_errors(tmp_path):
    good = tmp_path / "mine.jinja"
    good.write_text("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{{ eos_token }}{% endfor %}")
    template = resolve_template(str(good), None)
    assert template.name == "mine" and template.render([{"role": "user", "content": "x"}]) == "<user>x"
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for m in messages %}")
    with pytest.raises(TunelabError, match="does not compile"):
        resolve_template(str(bad), None).render([])
    with pytest.raises(TunelabError, match="not found"):
        resolve_template(str(tmp_path / "missing.jinja"), None)


def test_thinking_flag_on_a_template_without_thinking_is_an_error():
    with pytest.raises(TunelabError, match="no thinking mode"):
        get_template("llama3", enable_thinking=False)


def test_environment_features_match_transformers():
    template = ChatTemplate("t", "{{ x | tojson }}|{{ strftime_now('%Y') | length }}|"
                                 "{% for i in [1, 2, 3] %}{% if i == 2 %}{% break %}{% endif %}{{ i }}{% endfor %}|"
                                 "{% generation %}kept{% endgeneration %}")
    assert template.render([], x={"城市": "北京", "html": "<b>"}) == '{"城市": "北京", "html": "<b>"}|4|1|kept'
    with pytest.raises(Exception, match="boom"):
        ChatTemplate("t", "{{ raise_exception('boom') }}").render([])
