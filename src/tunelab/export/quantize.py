"""Export, optional step: quantize the MERGED model for inference (never the base before merging, see merge.py).

int8: torchao int8 weight-only (runs on CPU and GPU); bnb8/bnb4: bitsandbytes LLM.int8 / NF4 (GPU; CPU support
depends on the bitsandbytes build). The copy goes to <out>/<method>/ with the tokenizer and template, and its
size and greedy decoding speed next to the merged model's are recorded in its tunelab_export.json.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from tunelab.errors import TunelabError

SPEED_PROMPT = [{"role": "user", "content": "Write two sentences about the sea."}]


def quantization_config(method: str):
    from transformers import BitsAndBytesConfig, TorchAoConfig

    if method == "int8":
        try:
            from torchao.quantization import Int8WeightOnlyConfig
        except ImportError:
            raise TunelabError("export.quantize=int8 needs torchao: pip install 'tunelab[quant]'") from None
        return TorchAoConfig(Int8WeightOnlyConfig())
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise TunelabError(f"export.quantize={method} needs bitsandbytes: pip install 'tunelab[quant]'") from None
    if method == "bnb8":
        return BitsAndBytesConfig(load_in_8bit=True)
    if method == "bnb4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
    raise TunelabError(f"unknown quantization {method!r}; choose int8, bnb8 or bnb4")


def quantize_export(merged_dir: Path, method: str, measure: bool = True) -> dict:
    """Write <merged_dir>/<method>/ and return {folder, size_bytes, merged_size_bytes, tokens_per_s...}."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = merged_dir / method
    if target.exists():
        shutil.rmtree(target)
    try:
        model = AutoModelForCausalLM.from_pretrained(merged_dir, quantization_config=quantization_config(method))
    except TunelabError:
        raise
    except Exception as e:
        raise TunelabError(f"{method} quantization is not available here ({type(e).__name__}: {e})") from e
    try:
        model.save_pretrained(target, safe_serialization=True)
    except (RuntimeError, ValueError, NotImplementedError):  # some torchao/bnb layouts only serialize with torch.save
        model.save_pretrained(target, safe_serialization=False)
    AutoTokenizer.from_pretrained(merged_dir).save_pretrained(target, save_jinja_files=False)
    shutil.copy2(merged_dir / "chat_template.jinja", target / "chat_template.jinja")
    del model
    info = {"method": method, "folder": str(target), "size_bytes": folder_size(target, top_level_only=False),
            "merged_size_bytes": folder_size(merged_dir, top_level_only=True)}
    if measure:
        info["tokens_per_s"] = decode_speed(target)
        info["merged_tokens_per_s"] = decode_speed(merged_dir)
    (target / "tunelab_export.json").write_text(json.dumps({"kind": "quantized", **info, "folder": method}, indent=2), encoding="utf-8")
    return info


def folder_size(folder: Path, top_level_only: bool) -> int:
    files = folder.iterdir() if top_level_only else folder.rglob("*")
    return sum(p.stat().st_size for p in files if p.is_file() and p.suffix in (".safetensors", ".bin"))


def decode_speed(folder: Path, max_new_tokens: int = 32) -> float:
    """Greedy tokens per second of one chat answer (after one warm-up call)."""
    from tunelab.inference.engine import GenerationParams
    from tunelab.inference.hf import load_engine

    engine = load_engine(str(folder))
    prompt = engine.render(SPEED_PROMPT)
    params = GenerationParams(max_new_tokens=max_new_tokens, stop=[])
    engine.generate([prompt], GenerationParams(max_new_tokens=2))
    start = time.perf_counter()
    done = engine.generate([prompt], params)[0]
    return done.completion_tokens / (time.perf_counter() - start)
