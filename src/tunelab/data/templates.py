"""Chat templates: the one place a conversation becomes prompt text, for training, evaluation, chat and export.

A template is Jinja text rendered exactly as transformers renders `tokenizer.chat_template` (same environment,
filters and globals), so what tunelab trains on is what `apply_chat_template`, vLLM or llama.cpp later format.
Named templates live as data in chat_templates/*.jinja; `resolve_template` also accepts the tokenizer's own
template ("auto") or a path to a .jinja file.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any, ClassVar

from tunelab.errors import TunelabError
from tunelab.registry import Registry

log = logging.getLogger(__name__)

TEMPLATE_DIR = Path(__file__).parent / "chat_templates"
EOS = "{eos}"  # placeholder in stop_strings: the bound tokenizer's eos token
_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")
# Probe contents for working out a template's structure; no template trims or rewrites them.
_PROBE_USER, _PROBE_ASSISTANT = "tunelab probe question one", "tunelab probe answer one"
_PROBE_USER2, _PROBE_ASSISTANT2 = "tunelab probe question two", "tunelab probe answer two"


@lru_cache(maxsize=64)
def compile_jinja(source: str):
    """Compile once per template text (rendering is per record; compiling is ~1000x slower than rendering)."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlocks(jinja2.ext.Extension):
        """Accept transformers' `{% generation %}...{% endgeneration %}` markers (rendered as their body)."""

        tags: ClassVar[set[str]] = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # transformers' tojson: no HTML escaping, non-ASCII kept (Chinese stays readable in prompts)
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationBlocks, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise TunelabError(f"chat template does not compile: line {e.lineno}: {e.message}") from None


class ChatTemplate:
    """A Jinja chat template plus what the pipeline needs to know about it.

    `special_tokens` (bos_token, eos_token...) are passed to the template as transformers passes them;
    `enable_thinking`, when set, is baked into `jinja` as its default, so the saved template keeps the mode.
    `stop_strings` are the end-of-turn strings the model emits (EOS stands for the bound eos token).
    """

    def __init__(self, name: str, jinja: str, stop_strings: tuple[str, ...] = (), special_tokens: dict | None = None,
                 enable_thinking: bool | None = None):
        self.name = name
        self.enable_thinking = enable_thinking
        self.special_tokens = dict(special_tokens or {})
        self.jinja = _with_thinking_default(jinja, enable_thinking)
        eos = self.special_tokens.get("eos_token")
        stops = [eos if s == EOS else s for s in stop_strings]
        self.stop_strings = tuple(dict.fromkeys(s for s in stops if s))

    def __repr__(self) -> str:
        return f"ChatTemplate({self.name!r}, stop_strings={list(self.stop_strings)})"

    def render(self, messages: list[dict[str, Any]], tools: list[dict] | None = None,
               add_generation_prompt: bool = False, **kwargs: Any) -> str:
        variables = {**self.special_tokens, **kwargs}
        return self.compiled.render(messages=messages, tools=tools or None, documents=None,
                                    add_generation_prompt=add_generation_prompt, **variables)

    @cached_property
    def compiled(self):
        return compile_jinja(self.jinja)

    @property
    def renders_tool_calls(self) -> bool:
        return "tool_calls" in self.jinja

    @cached_property
    def headers(self) -> tuple[str, str]:
        """(generation prompt, assistant header inside a history): the text before an assistant reply.

        Worked out once by rendering probe conversations: the generation prompt is what add_generation_prompt
        appends; the history header is what precedes an earlier assistant turn (for templates with no assistant
        header at all, the text between a user message and the reply, e.g. Mistral's ` [/INST]`). They differ for some templates
        (Qwen3 with thinking off adds an empty <think> block only to the prompt).
        """
        user = [{"role": "user", "content": _PROBE_USER}]
        history = user + [{"role": "assistant", "content": _PROBE_ASSISTANT},
                          {"role": "user", "content": _PROBE_USER2},
                          {"role": "assistant", "content": _PROBE_ASSISTANT2}]
        try:
            bare, prompt, full = self.render(user), self.render(user, add_generation_prompt=True), self.render(history)
        except Exception as e:  # noqa: BLE001 - any template error: real data may still render; fall back to search
            log.debug("template %s: probe failed (%s)", self.name, e)
            return "", ""
        generation = prompt[_boundary(prompt, _common_prefix(bare, prompt)):]
        start = _boundary(full, _common_prefix(bare, full))
        pos = full.find(_PROBE_ASSISTANT, start)
        history = full[start:pos] if pos >= 0 else ""
        if not history.strip() and pos >= 0:
            # No text of its own before a reply (Mistral: `[INST] q [/INST]reply`): what closes the user turn is the
            # header, else the reply would be searched for from inside `[/INST]`.
            user_end = full.find(_PROBE_USER) + len(_PROBE_USER)
            history = full[user_end:pos] if 0 <= user_end - len(_PROBE_USER) and user_end <= pos else history
        return generation, history

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "stop_strings": list(self.stop_strings), "enable_thinking": self.enable_thinking}


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _boundary(text: str, pos: int) -> int:
    """Move `pos` back out of a half-matched special token: `<|end|>\n<|endoftext|>` and `<|end|>\n<|assistant|>`
    share the characters `<|`, which belong to the token that follows."""
    for opener, closer in (("<", ">"), ("[", "]")):
        j = text.rfind(opener, 0, pos)
        if j >= 0 and text.find(closer, j, pos) < 0:
            pos = j
    return pos


def _with_thinking_default(jinja: str, enable_thinking: bool | None) -> str:
    """Bake the thinking mode into the template text, so every later consumer (export, vLLM, llama.cpp) that
    renders this template without passing enable_thinking gets the mode training used."""
    if enable_thinking is None:
        return jinja
    value = "true" if enable_thinking else "false"
    return f"{{%- if enable_thinking is not defined %}}{{%- set enable_thinking = {value} %}}{{%- endif %}}\n{jinja}"


# ------------------------------------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class TemplateSpec:
    name: str
    jinja: str
    stop_strings: tuple[str, ...]
    special_tokens: dict  # defaults when no tokenizer is bound (the family's own tokens)
    description: str = ""

    @property
    def supports_thinking(self) -> bool:
        """data.enable_thinking switches its reasoning on or off."""
        return "enable_thinking" in self.jinja

    @property
    def supports_tools(self) -> bool:
        """It renders a `tools` list (function calling)."""
        return "tools" in self.jinja


TEMPLATES: Registry[TemplateSpec] = Registry("chat template", sort=True)  # the built-ins are read on first use

# name -> (file, stop strings, the family's special tokens, description). The text of each is its .jinja file.
_BUILTIN: dict[str, tuple[str, tuple[str, ...], dict, str]] = {
    "alpaca": ("alpaca.jinja", (EOS,), {"eos_token": "</s>"}, "Alpaca instruction/response, for base models"),
    "chatml": ("chatml.jinja", ("<|im_end|>",), {}, "plain ChatML, no default system prompt"),
    "qwen": ("qwen.jinja", ("<|im_end|>", "<|endoftext|>"), {"eos_token": "<|im_end|>"},
             "Qwen2.5 instruct: ChatML, default system prompt, tools"),
    "qwen3": ("qwen3.jinja", ("<|im_end|>", "<|endoftext|>"), {"eos_token": "<|im_end|>"},
              "Qwen3: ChatML, thinking on/off (data.enable_thinking), tools"),
    "llama3": ("llama3.jinja", ("<|eot_id|>",), {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
               "Llama 3 instruct"),
    "mistral": ("mistral.jinja", (EOS,), {"bos_token": "<s>", "eos_token": "</s>"}, "Mistral instruct v0.3"),
    "gemma": ("gemma.jinja", ("<end_of_turn>",), {"bos_token": "<bos>", "eos_token": "<eos>"},
              "Gemma 2/3 instruct, system folded into the first user turn"),
    "chatglm3": ("chatglm3.jinja", ("<|user|>", "<|observation|>", EOS), {"eos_token": "</s>"}, "ChatGLM3-6B"),
    "vicuna": ("vicuna.jinja", (EOS,), {"eos_token": "</s>"}, "Vicuna v1.1 USER:/ASSISTANT:"),
    "phi3": ("phi3.jinja", ("<|end|>", EOS), {"eos_token": "<|endoftext|>"}, "Phi-3 / Phi-3.5 instruct"),
    "internlm2": ("internlm2.jinja", ("<|im_end|>",), {"bos_token": "<s>", "eos_token": "</s>"},
                  "InternLM2 chat (bos + ChatML)"),
}


def register_template(name: str, jinja: str, stop_strings: tuple[str, ...] | list[str] = (EOS,),
                      special_tokens: dict | None = None, description: str = "") -> TemplateSpec:
    """Add a named template; `stop_strings` may contain EOS for the bound tokenizer's eos token."""
    _load_builtins()
    if name in TEMPLATES:
        raise ValueError(f"chat template {name!r} is already registered")
    compile_jinja(jinja)  # fail now on a syntax error, not when the first record is rendered
    return TEMPLATES.register(TemplateSpec(name, jinja, tuple(stop_strings), dict(special_tokens or {}), description))


ALIASES = {"default": "vicuna", "qwen2": "qwen", "qwen2.5": "qwen", "llama-3": "llama3", "phi-3": "phi3"}


def _load_builtins() -> None:
    if len(TEMPLATES):
        return
    for name, (file, stops, special, description) in _BUILTIN.items():
        text = (TEMPLATE_DIR / file).read_text(encoding="utf-8")
        TEMPLATES.register(TemplateSpec(name, text, stops, special, description))
    for alias, name in ALIASES.items():
        TEMPLATES.alias(alias, name)


def template_names() -> list[str]:
    _load_builtins()
    return TEMPLATES.names()


def template_specs() -> list[TemplateSpec]:
    """Every registered template with its description and capabilities, by name."""
    _load_builtins()
    return TEMPLATES.entries()


def get_template(name: str, enable_thinking: bool | None = None) -> ChatTemplate:
    """A registered template with its family's own special tokens (no tokenizer bound)."""
    _load_builtins()
    if name not in TEMPLATES:
        raise TunelabError(
            f"unknown chat template {name!r}; known: {', '.join(template_names())}, "
            "'auto' (the tokenizer's own) or a path to a .jinja file"
        )
    spec = TEMPLATES.get(name)
    _check_thinking(spec.name, spec.jinja, enable_thinking)
    return ChatTemplate(spec.name, spec.jinja, spec.stop_strings, spec.special_tokens, enable_thinking)


def _check_thinking(name: str, jinja: str, enable_thinking: bool | None) -> None:
    if enable_thinking is not None and "enable_thinking" not in jinja:
        raise TunelabError(
            f"chat template {name!r} has no thinking mode, so enable_thinking={enable_thinking} would be ignored; "
            "remove data.enable_thinking or use a thinking template such as qwen3"
        )


def resolve_template(name: str, tokenizer=None, enable_thinking: bool | None = None) -> ChatTemplate:
    """`auto` (the tokenizer's own template, chatml if it has none), a registered name, or a .jinja path,
    bound to the tokenizer's special tokens."""
    special = _special_tokens(tokenizer)
    if name == "auto":
        own = _tokenizer_template(tokenizer)
        if own is None:
            log.warning("the tokenizer has no chat template; using chatml")
            return resolve_template("chatml", tokenizer, enable_thinking)
        _check_thinking("auto", own, enable_thinking)
        return ChatTemplate("auto", own, _probe_stop_strings(own, tokenizer, special), special, enable_thinking)
    path = Path(name).expanduser()
    if name.endswith(".jinja") or path.is_file():
        if not path.is_file():
            raise TunelabError(f"chat template file not found: {path}")
        text = path.read_text(encoding="utf-8")
        _check_thinking(str(path), text, enable_thinking)
        return ChatTemplate(path.stem, text, _probe_stop_strings(text, tokenizer, special), special, enable_thinking)
    base = get_template(name, enable_thinking)
    merged = {**base.special_tokens, **special}
    spec = TEMPLATES.get(base.name)
    template = ChatTemplate(spec.name, spec.jinja, spec.stop_strings, merged, enable_thinking)
    _warn_split_stops(template, tokenizer)
    return template


def apply_template(tokenizer, template: ChatTemplate) -> None:
    """Make the tokenizer carry the exact training template, so every saved artifact formats prompts the same."""
    tokenizer.chat_template = template.jinja


def _tokenizer_template(tokenizer) -> str | None:
    own = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
    if isinstance(own, dict):  # several named templates: the default one is the chat format
        own = own.get("default") or next(iter(own.values()), None)
    return own or None


def _special_tokens(tokenizer) -> dict[str, str]:
    if tokenizer is None:
        return {}
    found = {}
    for key in _SPECIAL_KEYS:
        value = getattr(tokenizer, key, None)
        if isinstance(value, str) and value:
            found[key] = value
    return found


def _all_special(tokenizer) -> list[str]:
    tokens = set(getattr(tokenizer, "all_special_tokens", []) or [])
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    tokens.update(t.content for t in decoder.values() if getattr(t, "special", False))
    return [t for t in tokens if t]


def _probe_stop_strings(jinja: str, tokenizer, special: dict) -> tuple[str, ...]:
    """End-of-turn strings of an arbitrary template: the first special token after a probe assistant reply."""
    eos = special.get("eos_token")
    fallback = (eos,) if eos else ()
    if tokenizer is None:
        return fallback
    probe = ChatTemplate("probe", jinja, (), special)
    messages = [{"role": "user", "content": _PROBE_USER}, {"role": "assistant", "content": _PROBE_ASSISTANT},
                {"role": "user", "content": _PROBE_USER2}]
    try:
        text = probe.render(messages)
    except Exception:  # noqa: BLE001 - a template that refuses the probe: eos is the safe answer
        return fallback
    start = text.find(_PROBE_ASSISTANT)
    end = text.find(_PROBE_USER2, start)
    if start < 0 or end < 0:
        return fallback
    gap = text[start + len(_PROBE_ASSISTANT):end]
    hits = sorted((gap.find(t), t) for t in _all_special(tokenizer) if t in gap)
    stops = [hits[0][1]] if hits else []
    return tuple(dict.fromkeys([*stops, *fallback]))


def _warn_split_stops(template: ChatTemplate, tokenizer) -> None:
    """A named template whose end-of-turn string is not one token of this tokenizer trains a model that cannot
    stop cleanly: say so (the usual cause is picking another family's template)."""
    if tokenizer is None:
        return
    vocab = tokenizer.get_vocab()
    missing = [s for s in template.stop_strings if s not in vocab]
    if missing and len(missing) == len(template.stop_strings):
        log.warning("template %s: end-of-turn %s is not a single token of this tokenizer; the model may not learn "
                    "to stop. Is this the right template for the model?", template.name, missing)
