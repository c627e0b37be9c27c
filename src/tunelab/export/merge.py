"""Export, step 1: fold an adapter into its base and save a standard Hugging Face folder.

The folder carries the tokenizer with the exact training chat template (in tokenizer_config.json and
chat_template.jinja), and a generation_config whose eos list holds the end-of-turn token, so every tool that
reads it (transformers, vLLM, the GGUF converter) prompts and stops the model as it was trained.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from tunelab.errors import TunelabError
from tunelab.models.load import load_model, load_tokenizer
from tunelab.runs.artifacts import EXPORT_MARKER, Artifact

log = logging.getLogger(__name__)

RIGHT_PATH = (
    "reload the base model unquantized (16-bit or fp32), merge the adapter into it, then quantize the merged "
    "model. `tunelab export RUN` does exactly this for QLoRA runs (it reloads model.name without quantization); "
    "add --quantize int8 or --gguf q8_0 to quantize after merging"
)
PREFIX_NOTE = (
    "prefix tuning (P-Tuning v2) adds learned key/value vectors at every layer: they cannot be folded into the "
    "weights, so the export is the base model plus the adapter in prefix_adapter/ (tunelab chat/serve/eval load "
    "both; in Python: PeftModel.from_pretrained(base, 'prefix_adapter')). GGUF and Ollama cannot run it"
)


class QuantizedBaseError(TunelabError):
    """Merging into a 4/8-bit base would round the merged weights to the quantization grid."""


def is_quantized(model) -> bool:
    if getattr(model, "is_quantized", False) or getattr(model, "hf_quantizer", None) is not None:
        return True
    return any(type(m).__name__ in ("Linear4bit", "Linear8bitLt", "QuantLinear") for m in model.modules())


def refuse_quantized(model) -> None:
    """Raise QuantizedBaseError when `model` (or a PEFT model's base) holds quantized weights."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if is_quantized(base):
        quant = getattr(base.config, "quantization_config", None)
        kind = _describe_quantization(quant.to_dict() if hasattr(quant, "to_dict") else quant or {})
        raise QuantizedBaseError(
            f"refusing to merge the adapter into a {kind} quantized base: the merged weights would be rounded to the "
            f"quantization grid and the model would answer differently from the one you trained. Instead: {RIGHT_PATH}"
        )


def refuse_prequantized_folder(base_path: Path) -> None:
    """A base stored quantized (e.g. a *-bnb-4bit hub model) has no 16-bit weights to merge into."""
    config = base_path / "config.json"
    quant = json.loads(config.read_text(encoding="utf-8")).get("quantization_config") if config.is_file() else None
    if quant and quant.get("quant_method") != "gguf":
        raise QuantizedBaseError(
            f"the base model in {base_path} is stored {_describe_quantization(quant)} quantized, so there are no "
            "16-bit weights to merge into. Point model.name (or --base) at the original unquantized model; then: "
            f"{RIGHT_PATH}"
        )


def _describe_quantization(quant: dict) -> str:
    if quant.get("load_in_4bit") or quant.get("bits") == 4:
        return "4-bit"
    if quant.get("load_in_8bit") or quant.get("bits") == 8:
        return "8-bit"
    return str(quant.get("quant_method") or "quantized").replace("quantized", "").strip() or "quantized"


# GGUF general.file_type (llama.cpp's LLAMA_FTYPE): 0 all f32, 1 mostly f16, 32 mostly bf16; others are quantized.
_GGUF_FILE_DTYPE = {0: "float32", 1: "float16", 32: "bfloat16"}


def export_dtype(requested: str, base_path: Path) -> torch.dtype:
    """auto: the dtype the base model was released in, so a 16-bit model exports 16-bit weights and fp32 is only
    written on request. A base that tunelab converted from a GGUF (saved as fp32 for training, e.g. the embedded
    SmolLM2) takes the GGUF's precision: f32/f16/bf16 as stored, bf16 for a quantized GGUF (its 4-8-bit weights and
    16-bit scales need no 32-bit copy)."""
    if requested != "auto":
        return getattr(torch, requested)
    config = json.loads((base_path / "config.json").read_text(encoding="utf-8"))
    saved = config.get("dtype") or config.get("torch_dtype") or "float32"
    if saved == "float32" and (base_path / "tunelab_source.json").is_file():
        saved = _gguf_source_dtype(base_path / "tunelab_source.json") or saved
    return getattr(torch, saved) if saved in ("float32", "bfloat16", "float16") else torch.float32


def _gguf_source_dtype(source_file: Path) -> str | None:
    gguf_path = Path(json.loads(source_file.read_text(encoding="utf-8")).get("gguf") or "")
    if not gguf_path.is_file():
        return None
    from gguf import GGUFReader

    field = GGUFReader(gguf_path).get_field("general.file_type")
    file_type = int(field.contents()) if field is not None else None
    return _GGUF_FILE_DTYPE.get(file_type, "bfloat16") if file_type is not None else None


def adapter_merges(art: Artifact) -> bool:
    """Whether the adapter folds into the base: the run's method says so (Method.mergeable); a bare adapter
    folder is asked through peft (prompt-learning adapters such as prefix tuning cannot merge)."""
    if art.run_config is not None:
        from tunelab.methods import get_method

        return get_method(art.run_config.method.name).mergeable
    from peft import PeftConfig

    return not PeftConfig.from_pretrained(str(art.adapter_path)).is_prompt_learning


def load_merged(art: Artifact, dtype: str = "auto"):
    """(model, tokenizer, kind): the adapter merged into an unquantized base ('merged'), a full model as is
    ('full'), or the base with an adapter that cannot merge ('prefix', model is the plain base)."""
    refuse_prequantized_folder(art.base_path)
    torch_dtype = export_dtype(dtype, art.base_path)
    tokenizer = load_tokenizer(art.model_cfg, path=art.tokenizer_path)
    cfg = art.model_cfg.model_copy(update={"device": "cpu"})  # merging needs no accelerator; RAM holds it
    model = load_model(cfg, path=art.base_path, dtype=torch_dtype)
    if art.adapter_path is None:
        return model, tokenizer, "full"
    if not adapter_merges(art):
        return model, tokenizer, "prefix"
    from tunelab.inference.hf import apply_adapter

    peft_model = apply_adapter(model, art.adapter_path, tokenizer)
    refuse_quantized(peft_model)
    return peft_model.merge_and_unload(), tokenizer, "merged"


def save_hf_folder(model, tokenizer, template, out: Path, max_shard_size: str = "2GB") -> None:
    """Weights (safetensors shards), tokenizer with the training template, generation config stopping at the
    end-of-turn token."""
    end_tokens = [t for t in template.stop_strings if t in tokenizer.get_vocab()]
    if end_tokens and tokenizer.eos_token not in end_tokens:
        # Tools that know one eos (llama.cpp, Ollama, older vLLM) must stop at the end of the turn (LF#2884).
        log.info("exported eos token: %s (the template's end of turn) instead of %s", end_tokens[0], tokenizer.eos_token)
        tokenizer.eos_token = end_tokens[0]
    tokenizer.chat_template = template.jinja
    eos_ids = sorted({tokenizer.convert_tokens_to_ids(t) for t in [tokenizer.eos_token, *end_tokens]})
    model.config.eos_token_id = eos_ids[0] if len(eos_ids) == 1 else eos_ids
    model.generation_config.eos_token_id = eos_ids if len(eos_ids) > 1 else eos_ids[0]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True, max_shard_size=max_shard_size)
    # tokenizer_config.json gets the template (read by vLLM, TGI, llama.cpp); chat_template.jinja too (transformers 5)
    tokenizer.save_pretrained(out, save_jinja_files=False)
    (out / "chat_template.jinja").write_text(template.jinja, encoding="utf-8")


def save_prefix_export(model, tokenizer, template, art: Artifact, out: Path, max_shard_size: str) -> None:
    """Base model + prefix adapter side by side, with the marker load_engine follows."""
    import shutil

    save_hf_folder(model, tokenizer, template, out, max_shard_size)
    target = out / "prefix_adapter"
    if target.exists():
        shutil.rmtree(target)
    target.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"):
        if (art.adapter_path / name).is_file():
            shutil.copy2(art.adapter_path / name, target / name)


def write_marker(out: Path, info: dict) -> None:
    (out / EXPORT_MARKER).write_text(json.dumps(info, indent=2, ensure_ascii=False, default=str), encoding="utf-8")
