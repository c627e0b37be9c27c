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


def keep_cpu_weights_trainable(model) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference; returns the layers changed.

    On CPUs with AVX-512 BF16, a no-grad eval-mode forward (evaluation, generate) converts Linear4bit weights to
    an inference-only layout that `.train()` does not undo; backprop then runs through a kernel without autograd
    and the adapters below stop learning (docs/pitfalls.md #2). The flag is a per-layer attribute of bitsandbytes.
    """
    import bitsandbytes as bnb

    changed = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            changed += 1
    return changed


def apply_qlora(model, cfg):
    from peft import prepare_model_for_kbit_training

    # Gradient checkpointing is the Trainer's job (train.gradient_checkpointing), not a side effect of this call.
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if keep_cpu_weights_trainable(model):
        log.info("qlora: kept 4-bit CPU weights in the trainable layout")
    return apply_lora(model, cfg)


def _methods():
    from tunelab.methods import Method

    return [
        Method("qlora", apply_qlora, check=check_qlora, load_kwargs=qlora_load_kwargs,
               description="LoRA on a 4/8-bit bitsandbytes-quantized base"),
    ]


METHODS = _methods()
