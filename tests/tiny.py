"""Tiny random-weight models of several families, built offline, each with a real tokenizer and chat template.

The tokenizer is SmolLM2's real BPE tokenizer (from the embedded model) with each family's special tokens added,
so chat templates, special-token handling and masking behave as with the real models, at test speed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

TEMPLATES = Path(__file__).parent / "data" / "templates"
PACKAGE_TEMPLATES = Path(__file__).parents[1] / "src" / "tunelab" / "data" / "chat_templates"


@dataclass(frozen=True)
class Family:
    config_class: str
    template: Path
    special: tuple[str, ...]
    bos: str | None
    eos: str
    pad: str
    extra: dict = field(default_factory=dict)


FAMILIES: dict[str, Family] = {
    "llama": Family(
        "LlamaConfig", PACKAGE_TEMPLATES / "llama3.jinja",
        ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|finetune_right_pad_id|>"),
        "<|begin_of_text|>", "<|eot_id|>", "<|finetune_right_pad_id|>",
    ),
    "qwen2": Family("Qwen2Config", TEMPLATES / "qwen2.5.jinja", ("<tool_call>", "</tool_call>"),
                    None, "<|im_end|>", "<|endoftext|>"),
    "qwen3": Family("Qwen3Config", TEMPLATES / "qwen3.jinja",
                    ("<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"),
                    None, "<|im_end|>", "<|endoftext|>", {"head_dim": 16}),
    "mistral": Family("MistralConfig", TEMPLATES / "mistral-v0.3.jinja", ("<s>", "</s>", "[INST]", "[/INST]"),
                      "<s>", "</s>", "<unk>"),
    "gemma": Family("Gemma3TextConfig", PACKAGE_TEMPLATES / "gemma.jinja",
                    ("<bos>", "<eos>", "<pad>", "<start_of_turn>", "<end_of_turn>"),
                    "<bos>", "<end_of_turn>", "<pad>", {"head_dim": 16, "sliding_window": 64}),
}


def base_tokenizer_path() -> Path:
    from tunelab.config.schema import ModelConfig
    from tunelab.models.resolve import resolve_model_path

    return resolve_model_path(ModelConfig())


def build_tiny_model(family: str, out: Path, *, layers: int = 2, hidden: int = 64, seed: int = 0) -> Path:
    """Write a tiny random-weight `family` model with its tokenizer and chat template to `out`."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = FAMILIES[family]
    tokenizer = AutoTokenizer.from_pretrained(base_tokenizer_path())
    tokenizer.add_special_tokens({"additional_special_tokens": [t for t in spec.special if t not in ("<unk>",)]})
    if spec.bos:
        tokenizer.bos_token = spec.bos
    tokenizer.eos_token = spec.eos
    if spec.pad not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"pad_token": spec.pad})
    tokenizer.pad_token = spec.pad
    tokenizer.chat_template = spec.template.read_text(encoding="utf-8")
    vocab = (len(tokenizer) + 63) // 64 * 64
    config_class = getattr(transformers, spec.config_class)
    config = config_class(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False, **spec.extra,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
