"""Export, step 3: an Ollama Modelfile next to the GGUF, whose Go TEMPLATE matches the training chat template.

Ollama renders prompts with a Go text/template, not Jinja, so the template is written per family (chatml/Qwen,
Llama 3, Mistral, Gemma) with the exact generation prompt taken from the training template, then checked
against it on sample conversations (gotemplate.py). Other families get no TEMPLATE (Ollama then guesses from
the GGUF's stored Jinja template) and a warning. Known limits: tools and tool messages are not rendered, Jinja
`| trim` of message text is not reproduced (identical unless a message starts or ends with white space).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from jinja2 import TemplateError

from tunelab.export.gotemplate import render_go_template
from tunelab.export.target import MODELFILE_HEADER
from tunelab.export.verify import SAMPLE_CONVERSATIONS

_GO = {
    "chatml": (
        "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
    ),
    "llama3": (
        "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>"
        "{{- end }}"
    ),
    "mistral": (
        '{{- range .Messages }}\n{{- if eq .Role "user" }}[INST] {{ .Content }} [/INST]\n'
        '{{- else if eq .Role "assistant" }}{{ .Content }}{EOS}\n{{- end }}\n{{- end }}'
    ),
    "gemma": (
        '{{- $system := "" }}\n{{- range .Messages }}\n{{- if eq .Role "system" }}{{ $system = .Content }}\n'
        '{{- else if eq .Role "user" }}<start_of_turn>user\n{{ if $system }}{{ $system }}\n\n{{ end }}'
        '{{ $system = "" }}{{ .Content }}<end_of_turn>\n'
        '{{ else if eq .Role "assistant" }}<start_of_turn>model\n{{ .Content }}<end_of_turn>\n{{ end }}\n'
        "{{- end }}"
    ),
}
_MARKERS = {"chatml": "<|im_start|>", "llama3": "<|start_header_id|>", "gemma": "<start_of_turn>", "mistral": "[INST]"}


@dataclass
class Modelfile:
    text: str
    family: str | None
    template: str | None  # the Go TEMPLATE, None when the family is unknown
    system: str | None
    stops: list[str]
    mismatches: list[str] = field(default_factory=list)  # sample conversations rendered differently


def detect_family(jinja: str) -> str | None:
    found = [name for name, marker in _MARKERS.items() if marker in jinja]
    return found[0] if len(found) == 1 else None


def go_template(family: str, template, tokenizer) -> str:
    """The family's Go template with the training template's exact generation prompt appended (e.g. Qwen3's
    empty think block when thinking was off) and bos when the tokenizer does not add it by itself."""
    text = _GO[family].replace("{EOS}", tokenizer.eos_token or "")
    conv = [{"role": "user", "content": "hi"}]
    with_prompt = template.render(conv, add_generation_prompt=True)
    without = template.render(conv, add_generation_prompt=False)
    suffix = with_prompt[len(without):] if with_prompt.startswith(without) else ""
    if renders_bos(template, tokenizer, with_prompt) and not adds_bos(tokenizer):
        text = tokenizer.bos_token + text
    return text + suffix.replace("{{", '{{ "{{" }}')


def renders_bos(template, tokenizer, text: str) -> bool:
    """The template writes bos itself (`{{ bos_token }}`), as Llama 3, Mistral and Gemma templates do."""
    bos = tokenizer.bos_token
    return bool(bos) and "bos_token" in template.jinja and text.startswith(bos)


def adds_bos(tokenizer) -> bool:
    """Whether tokenizing adds bos by itself (then llama.cpp/Ollama add it too and the template must not)."""
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id


def default_system(template, tokenizer) -> str | None:
    """A system prompt the training template inserts when a conversation has none (SmolLM2, Qwen2.5)."""
    text = template.render([{"role": "user", "content": "hi"}], add_generation_prompt=False)
    text = text[len(tokenizer.bos_token):] if renders_bos(template, tokenizer, text) else text
    head = "<|im_start|>system\n"
    if text.startswith(head) and "<|im_end|>" in text:
        return text[len(head): text.index("<|im_end|>")]
    return None


def render_like_ollama(go: str, messages: list[dict], system: str | None, bos: str | None = None) -> str:
    """What Ollama would feed the model: the Modelfile SYSTEM is prepended when the chat has no system message."""
    if system and not (messages and messages[0]["role"] == "system"):
        messages = [{"role": "system", "content": system}, *messages]
    data = {"Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages], "System": system or ""}
    return render_go_template(go, data)


def template_mismatches(go: str, template, tokenizer, system: str | None) -> list[str]:
    """Sample conversations that Ollama (the Modelfile's SYSTEM, then its TEMPLATE) renders other than training did:
    training gave `system` (data.system) to every conversation without a system message of its own."""
    problems = []
    for conv in SAMPLE_CONVERSATIONS:
        if system and conv[0]["role"] != "system":
            trained = [{"role": "system", "content": system}, *conv]
        else:
            trained = conv
        try:
            expected = template.render(trained, add_generation_prompt=True)
        except TemplateError:  # the training template rejects this shape (e.g. Mistral has no system role)
            continue
        if adds_bos(tokenizer) and renders_bos(template, tokenizer, expected):  # llama.cpp adds this one
            expected = expected[len(tokenizer.bos_token):]
        got = render_like_ollama(go, conv, system)
        if got != expected:
            problems.append(f"{conv[-1]['content'][:30]!r}: Ollama {got!r} != training {expected!r}")
    return problems


def build_modelfile(gguf_name: str, template, tokenizer, *, system: str | None = None,
                    parameters: dict[str, object] | None = None) -> Modelfile:
    family = detect_family(template.jinja)
    system = system if system is not None else default_system(template, tokenizer)
    stops = list(dict.fromkeys([*template.stop_strings, *([tokenizer.eos_token] if tokenizer.eos_token else [])]))
    if family is not None and _MARKERS[family] not in stops:
        stops.append(_MARKERS[family])  # never run on into a new turn
    lines = [f"{MODELFILE_HEADER} Chat template family: {family or 'unknown'}.", f"FROM ./{gguf_name}", ""]
    go, mismatches = None, []
    if family is not None:
        go = go_template(family, template, tokenizer)
        mismatches = template_mismatches(go, template, tokenizer, system)
        lines += [f'TEMPLATE """{go}"""', ""]
    else:
        lines += ["# No TEMPLATE: this chat template is not one of chatml, llama3, mistral, gemma; Ollama falls back",
                  "# to the Jinja template stored in the GGUF if it recognizes it (check: ollama show --template).", ""]
    if system:
        lines += [f'SYSTEM """{system}"""', ""]
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    lines += [f"PARAMETER {k} {v}" for k, v in (parameters or {}).items()]
    return Modelfile("\n".join(lines) + "\n", family, go, system, stops, mismatches)


def write_modelfile(out_dir: Path, modelfile: Modelfile, overwrite: bool = False) -> Path:
    """<out_dir>/Modelfile; an existing one is replaced only with `overwrite` (target.py rules)."""
    import os

    from tunelab.export.target import is_tunelab_modelfile, refuse_existing_file

    path = out_dir / "Modelfile"
    refuse_existing_file(path, overwrite, written_by_tunelab=is_tunelab_modelfile(path))
    partial = out_dir / ".Modelfile.partial"
    partial.write_text(modelfile.text, encoding="utf-8")
    os.replace(partial, path)
    return path
