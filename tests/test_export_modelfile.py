"""Ollama Modelfile: family templates render exactly like the training Jinja templates (checked by a small Go
template renderer, and by real Go's text/template when a Go toolchain is installed), stops, default system."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
from jinja2 import TemplateError

from tunelab.data.templates import ChatTemplate, resolve_template
from tunelab.export.gotemplate import render_go_template
from tunelab.export.modelfile import build_modelfile, detect_family, render_like_ollama
from tunelab.export.verify import SAMPLE_CONVERSATIONS
from tunelab.inference.template import load_template

FAMILY_OF = {"llama": "llama3", "qwen2": "chatml", "qwen3": "chatml", "mistral": "mistral", "gemma": "gemma"}
EXTRA_CONVERSATIONS = [
    [{"role": "user", "content": "第一个问题"}, {"role": "assistant", "content": "第一个回答"},
     {"role": "user", "content": "第二个问题？"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why is the sky blue?"}],
]


def family_template(folder):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    return load_template(tokenizer), tokenizer


def test_every_family_matches_its_training_template(any_family):
    family, folder = any_family
    template, tokenizer = family_template(folder)
    mf = build_modelfile("model-q8_0.gguf", template, tokenizer, parameters={"num_ctx": 2048})
    assert mf.family == FAMILY_OF[family] and mf.mismatches == []
    assert mf.text.startswith("# Written by tunelab export") and "FROM ./model-q8_0.gguf" in mf.text
    assert f'TEMPLATE """{mf.template}"""' in mf.text and "PARAMETER num_ctx 2048" in mf.text
    assert f'PARAMETER stop "{tokenizer.eos_token}"' in mf.text
    for conv in EXTRA_CONVERSATIONS:
        try:
            expected = template.render(conv, add_generation_prompt=True)
        except TemplateError:  # Mistral's template has no system role
            continue
        assert render_like_ollama(mf.template, conv, mf.system) == expected


def test_default_system_prompt_becomes_system(tiny_models):
    template, tokenizer = family_template(tiny_models["qwen2"])
    mf = build_modelfile("m.gguf", template, tokenizer)
    assert mf.system == "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    assert f'SYSTEM """{mf.system}"""' in mf.text
    assert build_modelfile("m.gguf", template, tokenizer, system="Réponds en français.").system == \
        "Réponds en français."


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_a_runs_system_prompt_is_compared_as_training_rendered_it(tiny_models, family):
    """A run trained with data.system: training gave it to every conversation without a system message, and the
    Modelfile's SYSTEM does the same, so the check finds no difference (it compared against the template's own
    default system prompt, and every `tunelab export` of the demo run failed with TEMPLATE DIFFERS)."""
    template, tokenizer = family_template(tiny_models[family])
    mf = build_modelfile("m.gguf", template, tokenizer, system="You are a helpful assistant.")
    assert mf.family is not None and mf.mismatches == []


def test_embedded_smollm2_template():
    from tunelab.config.schema import ModelConfig
    from tunelab.models.resolve import resolve_model_path

    template, tokenizer = family_template(resolve_model_path(ModelConfig()))
    mf = build_modelfile("smollm2-q8_0.gguf", template, tokenizer)
    assert mf.family == "chatml" and mf.mismatches == [] and "SmolLM" in mf.system
    assert 'PARAMETER stop "<|im_end|>"' in mf.text


def test_thinking_off_generation_prompt(tiny_models):
    _, tokenizer = family_template(tiny_models["qwen3"])
    template = resolve_template("auto", tokenizer, enable_thinking=False)
    mf = build_modelfile("m.gguf", template, tokenizer)
    assert mf.template.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n") and mf.mismatches == []


def test_unknown_family_gets_no_template(tiny_models):
    _, tokenizer = family_template(tiny_models["llama"])
    template = ChatTemplate("odd", "{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}",
                            ("<|eot_id|>",), {"eos_token": "<|eot_id|>"})
    assert detect_family(template.jinja) is None
    mf = build_modelfile("m.gguf", template, tokenizer)
    assert mf.template is None and "TEMPLATE" not in mf.text.replace("# No TEMPLATE", "")


def test_go_renderer_semantics():
    data = {"Messages": [{"Role": "user", "Content": "a"}, {"Role": "assistant", "Content": "b"}], "System": ""}
    assert render_go_template("x  \n{{- range .Messages }}[{{ .Role }}]{{ end -}}  \n y", data) == "x[user][assistant]y"
    tpl = '{{ $n := "" }}{{ range .Messages }}{{ if eq .Role "user" }}U{{ else if eq .Role "x" }}X{{ else }}' \
          '{{ $n = .Content }}A{{ end }}{{ end }}{{ $n }}{{ if not .System }}!{{ end }}{{ len .Messages }}'
    assert render_go_template(tpl, data) == "UAb!2"
    with pytest.raises(ValueError):
        render_go_template("{{ printf .Role }}", data)


GO_MAIN = """package main
import ("encoding/json"; "os"; "text/template")
func main() {
    src, _ := os.ReadFile(os.Args[1])
    var data map[string]any
    if err := json.NewDecoder(os.Stdin).Decode(&data); err != nil { panic(err) }
    template.Must(template.New("t").Parse(string(src))).Execute(os.Stdout, data)
}
"""


@pytest.mark.skipif(shutil.which("go") is None, reason="no Go toolchain: the Python renderer alone is checked")
def test_python_renderer_agrees_with_real_go(tmp_path, tiny_models):
    (tmp_path / "main.go").write_text(GO_MAIN)
    binary = tmp_path / "render"
    subprocess.run(["go", "build", "-o", str(binary), str(tmp_path / "main.go")], check=True, cwd=tmp_path,
                   env={"HOME": str(tmp_path), "GOCACHE": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin",
                        "GO111MODULE": "off"})
    for family in sorted(FAMILY_OF):
        template, tokenizer = family_template(tiny_models[family])
        mf = build_modelfile("m.gguf", template, tokenizer)
        (tmp_path / "t.tmpl").write_text(mf.template)
        for conv in SAMPLE_CONVERSATIONS + EXTRA_CONVERSATIONS:
            messages = [{"Role": m["role"], "Content": m["content"]} for m in conv]
            data = {"Messages": messages, "System": ""}
            go = subprocess.run([str(binary), str(tmp_path / "t.tmpl")], input=json.dumps(data), text=True,
                                capture_output=True, check=True).stdout
            assert go == render_go_template(mf.template, data), (family, conv)
