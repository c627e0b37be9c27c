"""Stage 3 (method): QLoRA, LoRA on a base quantized to 4 (NF4/FP4) or 8 bits by bitsandbytes.

Availability is checked for real before loading: a tiny tensor is quantized on the target device, so a
bitsandbytes build without a backend for that device fails in a second with a message, not after loading.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

from tunelab.errors import MethodUnavailableError
from tunelab.methods.lora import apply_lora
from tunelab.patches.bitsandbytes import keep_cpu_weights_trainable

log = logging.getLogger(__name__)

INSTEAD = "use method.name: lora (same adapters on an unquantized base) or a device bitsandbytes supports"


def check_qlora(cfg, device: str) -> None:
    if importlib.util.find_spec("bitsandbytes") is None:
        raise MethodUnavailableError(
            "method qlora needs bitsandbytes, which is not installed: pip install 'tunelab[quant]' "
            f"(or pip install bitsandbytes); or {INSTEAD}"
        )
    import torch

    try:
        import bitsandbytes.functional as bnbf

        probe = torch.randn(64, 64, device=device, dtype=torch.float32)
        if cfg.bits == 4:
            packed, state = bnbf.quantize_4bit(probe, quant_type=cfg.quant_type, compress_statistics=cfg.double_quant)
            bnbf.dequantize_4bit(packed, state)
        else:
            bnbf.int8_vectorwise_quant(probe.to(torch.float16))
    except Exception as e:  # noqa: BLE001 - any failure of the probe means: no usable backend here
        raise MethodUnavailableError(
            f"method qlora ({cfg.bits}-bit) cannot run on device {device!r} with the installed bitsandbytes "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); {INSTEAD}"
        ) from None


def compute_dtype(cfg, device: str):
    import torch

    if cfg.compute_dtype != "auto":
        return getattr(torch, cfg.compute_dtype)
    if device == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def qlora_load_kwargs(cfg, device: str) -> dict[str, Any]:
    from transformers import BitsAndBytesConfig

    if cfg.bits == 8:
        quant = BitsAndBytesConfig(load_in_8bit=True)
    else:
        quant = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=cfg.quant_type,
            bnb_4bit_use_double_quant=cfg.double_quant,
            bnb_4bit_compute_dtype=compute_dtype(cfg, device),
        )
    return {"quantization_config": quant, "device_map": {"": device}}


def quantized_weight_bytes(cfg) -> float:
    """Bytes per quantized base weight: the packed values plus their quantization constants."""
    return cfg.bits / 8 + 0.07


def apply_qlora(model, cfg):
    from peft import prepare_model_for_kbit_training

    # Gradient checkpointing is the Trainer's job (train.gradient_checkpointing), not a side effect of this call.
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if keep_cpu_weights_trainable(model):
        log.info("qlora: kept 4-bit CPU weights in the trainable layout")
    return apply_lora(model, cfg)


def _methods():
    from tunelab.config.schema import QLoraConfig
    from tunelab.methods import Method

    return [
        Method("qlora", apply_qlora, QLoraConfig, check=check_qlora, load_kwargs=qlora_load_kwargs,
               description="LoRA on a 4/8-bit bitsandbytes-quantized base", summary_keys=("r", "bits"),
               is_adapter=True, mergeable=True, quantized_base=True, base_weight_bytes=quantized_weight_bytes,
               apply_unquantized=apply_lora),
    ]


METHODS = _methods()
