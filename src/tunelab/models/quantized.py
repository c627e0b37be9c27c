"""Stage 2 (model), inference only: the base loaded in 8-bit (LLM.int8) or 4-bit NF4 by bitsandbytes.

`model.quantize: int8 | nf4` (`tunelab chat/eval/serve --quantize`) goes through transformers' BitsAndBytesConfig;
a run's adapter is applied on top by the engine as usual. Such a model is for generation and evaluation only:
on CPU, bitsandbytes repacks Linear4bit weights into an inference layout on the first no-grad forward, and a model
trained afterwards learns nothing without any error (docs/pitfalls.md #2). So every model loaded here is marked,
and the training path (methods.apply_method) refuses a marked model; training on a quantized base is method qlora.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

import torch

from tunelab.config.schema import ModelConfig
from tunelab.errors import TunelabError

log = logging.getLogger(__name__)

# set on every model loaded here (a PeftModel wrapping it forwards attribute reads to it)
INFERENCE_ONLY = "tunelab_inference_quantize"
# what `apply_method` and training say when handed such a model or config
TRAIN_INSTEAD = ("train with method.name: qlora (4/8-bit base in bitsandbytes' trainable layout) and set "
                 "model.quantize: none; model.quantize is for chat, eval and serve only")
PITFALL = ("bitsandbytes repacks 4-bit CPU weights for inference on the first eval forward and training through "
           "them learns nothing (docs/pitfalls.md #2)")


class _CastNotice(logging.Filter):
    """LLM.int8 logs "inputs will be cast ... to float16" on EVERY matmul of an fp32 model (thousands per answer);
    it says how the kernel works, not that anything is wrong. Said once at load instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "inputs will be cast" not in record.getMessage()


def check_bitsandbytes(quantize: str, device: str) -> None:
    """Refuse before any weight is loaded when bitsandbytes is missing or has no kernel for `device`."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise TunelabError(
            f"model.quantize={quantize} (--quantize) needs bitsandbytes, which is not installed: "
            "pip install 'tunelab[quant]' (or pip install bitsandbytes); or load in full precision (model.quantize: none)"
        )
    if device == "mps":
        raise TunelabError(f"model.quantize={quantize}: bitsandbytes has no Apple MPS backend; use --device cpu")
    try:
        import bitsandbytes.functional as bnbf

        probe = torch.randn(64, 64, device=device, dtype=torch.float32)
        if quantize == "nf4":
            bnbf.dequantize_4bit(*bnbf.quantize_4bit(probe, quant_type="nf4"))
        else:
            bnbf.int8_vectorwise_quant(probe.to(torch.float16))
    except Exception as e:  # noqa: BLE001 - any failure of the probe means: no usable backend here
        first = str(e).splitlines()[0] if str(e) else ""
        raise TunelabError(
            f"model.quantize={quantize}: the installed bitsandbytes cannot quantize on device {device!r} "
            f"({type(e).__name__}: {first}); use model.quantize: none or another device"
        ) from None


def compute_dtype(device: str) -> torch.dtype:
    """NF4 matmul dtype: bf16 on GPUs that have it, else fp16; fp32 on CPU, whose packed NF4 kernel (AVX-512 BF16)
    ignores it, and whose fallback kernel is the most accurate in fp32."""
    if device == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def bnb_config(quantize: str, device: str):
    """transformers' BitsAndBytesConfig for `quantize` (int8: Linear8bitLt; nf4: Linear4bit, double quantized)."""
    from transformers import BitsAndBytesConfig

    if quantize == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    if quantize == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype(device))
    raise TunelabError(f"model.quantize={quantize!r}: expected none, int8 or nf4")


def load_quantized(cfg: ModelConfig, path: Path, device: str, dtype: torch.dtype, **kwargs: Any):
    """The causal LM in `path` with its Linear layers quantized as `cfg.quantize` says, marked inference-only."""
    from transformers import AutoModelForCausalLM

    if "quantization_config" in kwargs:  # the QLoRA method's own (trainable) quantization
        raise TunelabError(f"model.quantize={cfg.quantize} cannot be combined with a training quantization; "
                           f"{TRAIN_INSTEAD}")
    check_bitsandbytes(cfg.quantize, device)
    if cfg.quantize == "int8":
        logging.getLogger("bitsandbytes.autograd._functions").addFilter(_CastNotice())
        if dtype != torch.float16:
            log.info("int8: activations are cast to float16 for each LLM.int8 matmul (bitsandbytes' kernel)")
    kwargs.pop("device_map", None)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, attn_implementation=cfg.attn_implementation, trust_remote_code=cfg.trust_remote_code,
        quantization_config=bnb_config(cfg.quantize, device), device_map={"": device}, **kwargs,
    )
    setattr(model, INFERENCE_ONLY, cfg.quantize)
    log.info("loaded %s with %s bitsandbytes layers (%s)", path, cfg.quantize, quantized_layers(model))
    return model


def inference_quantization(model) -> str | None:
    """int8 / nf4 when `model` (or the base a PEFT model wraps) was loaded here; None otherwise."""
    return getattr(model, INFERENCE_ONLY, None)


def refuse_training(model, what: str = "training") -> None:
    """Raise when `model` was loaded by model.quantize for inference (never train it, module docstring)."""
    quantize = inference_quantization(model)
    if quantize is not None:
        raise TunelabError(f"{what}: this model was loaded with model.quantize={quantize} for inference only; "
                           f"{PITFALL}. {TRAIN_INSTEAD}")


def refuse_training_config(cfg: ModelConfig) -> None:
    """The same refusal for a training run's config, before anything is loaded."""
    if cfg.quantize != "none":
        raise TunelabError(f"model.quantize={cfg.quantize} is for inference only ({PITFALL}); {TRAIN_INSTEAD}")


def quantized_layers(model) -> dict[str, int]:
    """Count of each bitsandbytes Linear type in `model`, e.g. {"Linear4bit": 14}."""
    import bitsandbytes as bnb

    counts: dict[str, int] = {}
    for module in model.modules():
        if isinstance(module, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit)):
            counts[type(module).__name__] = counts.get(type(module).__name__, 0) + 1
    return counts
