"""Load tokenizers and models the same way for training, evaluation, chat, export and serving."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from tunelab.config.schema import ModelConfig
from tunelab.models.resolve import resolve_model_path

log = logging.getLogger(__name__)

# Tokens that are safe to pad with: never an end-of-turn token the model must learn to emit.
_PAD_CANDIDATES = ("<|endoftext|>", "<pad>", "<|pad|>", "<|finetune_right_pad_id|>", "<unk>", "[PAD]")


def pick_device(requested: str = "auto") -> str:
    if requested != "auto":
        if requested == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("model.device is cuda but no CUDA GPU is visible; use device: cpu or auto")
        return requested
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def pick_dtype(requested: str, device: str) -> torch.dtype:
    """fp32 on CPU/MPS, bf16 on GPUs that support it, else fp16, unless the config says otherwise."""
    if requested != "auto":
        return getattr(torch, requested)
    if device == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def end_of_turn_tokens(tokenizer) -> set[str]:
    """Tokens a chat model emits to end its turn: eos plus the usual family-specific terminators."""
    names = {tokenizer.eos_token} if tokenizer.eos_token else set()
    vocab = tokenizer.get_vocab()
    for t in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>", "</s>", "<|user|>",
              "<|observation|>", "<｜end▁of▁sentence｜>"):
        if t in vocab and t in (tokenizer.all_special_tokens + list(tokenizer.added_tokens_encoder)):
            names.add(t)
    return names


def make_pad_safe(tokenizer, end_tokens: set[str] | None = None) -> None:
    """Give the tokenizer a pad token that is not an end-of-turn token.

    Collators in tunelab never mask by pad id (labels come from the encoder), but other tools do, and a pad
    equal to eos is the classic cause of models that never stop (LF#2884, trl#976). Prefer a spare token.
    """
    ends = end_tokens if end_tokens is not None else end_of_turn_tokens(tokenizer)
    ends = ends - {"<|endoftext|>"} if tokenizer.eos_token != "<|endoftext|>" else ends
    if tokenizer.pad_token is not None and tokenizer.pad_token not in ends:
        return
    vocab = tokenizer.get_vocab()
    for candidate in _PAD_CANDIDATES:
        if candidate in vocab and candidate not in ends:
            tokenizer.pad_token = candidate
            return
    if tokenizer.pad_token is None:  # last resort: eos; still safe because our labels never depend on pad
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token


def load_tokenizer(cfg: ModelConfig, path: Path | None = None):
    from transformers import AutoTokenizer

    path = path or resolve_model_path(cfg)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    make_pad_safe(tokenizer)
    return tokenizer


def load_model(cfg: ModelConfig, path: Path | None = None, **kwargs: Any):
    """Load the causal LM with the device's dtype; extra kwargs (quantization_config...) go to from_pretrained."""
    from transformers import AutoModelForCausalLM

    path = path or resolve_model_path(cfg)
    device = pick_device(cfg.device)
    dtype = kwargs.pop("dtype", None) or pick_dtype(cfg.dtype, device)
    if cfg.quantize != "none":  # bitsandbytes 8/4-bit, for inference only (models/quantized.py)
        from tunelab.models.quantized import load_quantized

        return load_quantized(cfg, path, device, dtype, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(
        path,
        dtype=dtype,
        attn_implementation=cfg.attn_implementation,
        trust_remote_code=cfg.trust_remote_code,
        **kwargs,
    )
    if "quantization_config" not in kwargs and "device_map" not in kwargs:
        model.to(device)
    return model
