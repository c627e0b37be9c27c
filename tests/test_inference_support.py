"""Helpers shared by the inference, chat and export tests: adapters and run directories made directly with peft.

They stand in for the training stage's outputs (same layout as docs/architecture.md) so these tests do not wait
for training; the LoRA B matrices are random so the adapter really changes the outputs.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

CUSTOM_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }} says<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant says<|end_header_id|>\n\n{% endif %}"
)


def make_adapter(base: Path, out: Path, kind: str = "lora", seed: int = 1, template: str | None = None) -> Path:
    """Save a PEFT adapter for `base` (lora, dora or prefix) with the tokenizer, as training's final/ does."""
    from peft import LoraConfig, PrefixTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if kind == "prefix":
        config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, prefix_projection=True,
                                    encoder_hidden_size=32)
    else:
        config = LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules="all-linear",
                            init_lora_weights=False, use_dora=kind == "dora")
    peft_model = get_peft_model(model, config)
    if kind == "prefix":  # a fresh prefix encoder is tiny; scale it so it visibly changes the outputs
        with torch.no_grad():
            for p in peft_model.prompt_encoder.parameters():
                p.mul_(20)
    peft_model.save_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(base)
    if template is not None:
        tokenizer.chat_template = template
    tokenizer.save_pretrained(out)
    return out


def add_reverse_data(run: Path, count: int, words: int = 2) -> Path:
    """Give a run's config.yaml a training file of `count` "Reverse: a0 b0" conversations, 4 of them held out."""
    letters = "abcdefgh"[:words]
    data = run.parent / "d.jsonl"
    data.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": "Reverse: " + " ".join(f"{x}{i}" for x in letters)},
        {"role": "assistant", "content": " ".join(f"{x}{i}" for x in reversed(letters))}]}) + "\n"
        for i in range(count)))
    with open(run / "config.yaml", "a") as f:
        f.write(f"data:\n  datasets:\n    - path: {data}\n  val_size: 4\n")
    return data


def make_run_dir(base: Path, root: Path, kind: str = "lora", template: str | None = None,
                 method_yaml: str | None = None) -> Path:
    """runs/<name>/ with config.yaml, run.json, chat_template.jinja and final/ (adapter or full model)."""
    run = root / f"run-{kind}"
    final = run / "final"
    if kind == "full":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        AutoModelForCausalLM.from_pretrained(base).save_pretrained(final)
        tok = AutoTokenizer.from_pretrained(base)
        if template is not None:
            tok.chat_template = template
        tok.save_pretrained(final)
    else:
        make_adapter(base, final, "lora" if kind == "qlora" else kind, template=template)
    method = method_yaml or {"lora": "name: lora", "dora": "name: dora", "qlora": "name: qlora\n  bits: 4",
                             "prefix": "name: prefix", "full": "name: full"}[kind]
    (run / "config.yaml").write_text(f"model:\n  name: {base}\nmethod:\n  {method}\n", encoding="utf-8")
    (run / "run.json").write_text(json.dumps({"status": "completed", "method": kind}), encoding="utf-8")
    if template is not None:
        (run / "chat_template.jinja").write_text(template, encoding="utf-8")
    return run
