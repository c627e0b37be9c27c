"""Stage 4 (training): estimate the memory a run needs before any weight is loaded, and refuse runs that cannot fit.

The model is built on the meta device (no memory, a fraction of a second) and the method applied to it, so the
trainable / total counts are exact; activations follow the usual per-token accounting of a decoder block
(Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models"), calibrated on
SmolLM2-135M on CPU (docs/pitfalls.md #7: LoRA, fp32, 8 x 512 tokens padded: 12.4 GB peak RSS).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tunelab.config.schema import RunConfig
from tunelab.errors import TunelabError

if TYPE_CHECKING:
    from tunelab.config.schema import RunConfig

log = logging.getLogger(__name__)

GB = 1024**3
RUNTIME_OVERHEAD = 0.6 * GB  # python, torch and tokenizer libraries (measured RSS when training starts)
ALLOCATOR_SLACK = 1.2  # freed activation blocks of different sizes are not all reused (measured RSS / live bytes)
OBVIOUSLY_TOO_BIG = 1.5  # refuse without max_memory_gb when the estimate is this many times what is free


@dataclass
class MemoryEstimate:
    """Bytes per component; `total` is what the run is expected to peak at on its device."""

    weights: float
    gradients: float
    optimizer: float
    activations: float
    logits: float
    overhead: float
    trainable_params: int
    total_params: int
    tokens_per_step: int
    reference: float = 0.0  # alignment: the reference model's forward (and its weights when it is a second copy)

    @property
    def total(self) -> float:
        return (self.weights + self.gradients + self.optimizer + self.activations + self.logits + self.overhead
                + self.reference)

    def describe(self) -> str:
        parts = ", ".join(
            f"{name} {getattr(self, name) / GB:.2f}"
            for name in ("weights", "gradients", "optimizer", "activations", "logits", "overhead")
        ) + (f", reference {self.reference / GB:.2f}" if self.reference else "")
        return (f"memory estimate: {self.total / GB:.2f} GB ({parts} GB; {self.tokens_per_step:,} tokens per "
                f"micro-batch, {self.trainable_params:,} of {self.total_params:,} params trainable)")


def dtype_bytes(dtype) -> int:
    import torch

    return torch.empty((), dtype=dtype).element_size()


def activation_elements_per_token(config, gradient_checkpointing: bool) -> float:
    """Tensors a decoder block keeps for backward, in elements per token, summed over layers."""
    hidden = config.hidden_size
    inter = getattr(config, "intermediate_size", None) or 4 * hidden
    layers = config.num_hidden_layers
    # norms, q/k/v/o inputs and outputs, residuals, adapter dropout copies (~16 h) + the gated MLP (~5 I)
    per_layer = 16 * hidden + 5 * inter
    if gradient_checkpointing:  # only each layer's input is kept; one layer is recomputed at a time
        return layers * hidden + per_layer
    return layers * per_layer


@dataclass(frozen=True)
class ParameterBytes:
    """The model's parameters as the method leaves them: how many, and bytes per element."""

    trainable: int
    total: int
    weight_bytes: float  # per weight (a quantized base: its packed size, constants included)
    trainable_bytes: int  # per trainable parameter, and so per gradient and optimizer-state element


@dataclass(frozen=True)
class StepShape:
    """One micro-batch as the optimizer step runs it."""

    tokens: int  # tokens per micro-batch
    act_bytes: int  # element size of the residual stream (the weights' dtype)
    gradient_checkpointing: bool = False
    autocast: bool = False  # 16-bit autocast over the weights' dtype


def estimate_memory(config, params: ParameterBytes, step: StepShape, device: str = "cpu") -> MemoryEstimate:
    """Peak memory of one optimizer step with AdamW (two states per trainable parameter).

    Autocast over fp32 weights does not shrink what is saved for backward (the 32-bit inputs and their 16-bit casts
    are both kept; measured on SmolLM2 with bf16 autocast: 4.5 GB peak RSS over the 60-step demo run, 4.2 GB
    estimated), but it adds each frozen weight's 16-bit copy and 16-bit logits.
    """
    vocab = getattr(config, "vocab_size", 32000)
    acts = activation_elements_per_token(config, step.gradient_checkpointing) * step.act_bytes * step.tokens
    # logits in the compute dtype, their fp32 upcast, log-softmax and its gradient (+ the 16-bit copies)
    logits = step.tokens * vocab * (3 * 4 + (4 if step.autocast else step.act_bytes))
    weight_copies = 2 * params.total if step.autocast else 0
    return MemoryEstimate(
        weights=params.total * params.weight_bytes + weight_copies,
        gradients=params.trainable * params.trainable_bytes,
        optimizer=2 * params.trainable * params.trainable_bytes,
        activations=acts * ALLOCATOR_SLACK,
        logits=logits * ALLOCATOR_SLACK,
        overhead=RUNTIME_OVERHEAD if device == "cpu" else 0.5 * GB,
        trainable_params=params.trainable,
        total_params=params.total,
        tokens_per_step=step.tokens,
    )


def reference_memory(estimate: MemoryEstimate, layers: int, separate_copy: bool) -> float:
    """Bytes the reference forward of an alignment step adds: it runs without gradients, so it keeps one decoder
    layer's working set instead of every layer's activations, plus its logits (TRL: fp32 log-probs, no gradients);
    a separate reference model (full/freeze methods) also holds a second copy of the weights."""
    transient = estimate.activations / max(1, layers) + estimate.logits / 3
    return transient + (estimate.weights if separate_copy else 0.0)


def count_with_method(model_path: Path, method_cfg, trust_remote_code: bool = False) -> tuple[int, int, object]:
    """(trainable, total, config) of the model with the method applied, built on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from tunelab.methods import apply_method, count_parameters, get_method

    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    if getattr(method_cfg, "init_from", None):  # counts come from the config; the adapter is read later
        method_cfg = method_cfg.model_copy(update={"init_from": None})
    unquantized = get_method(method_cfg.name).apply_unquantized
    if unquantized is not None:  # quantization needs real weights; the trainable counts are the same
        model = unquantized(model, method_cfg)
    else:
        model = apply_method(model, method_cfg)
    trainable, total = count_parameters(model)
    return trainable, total, config


def estimate_for_run(cfg: RunConfig, model_path: Path, *, device: str, dtype, mixed_precision: str | None,
                     tokens_per_step: int) -> MemoryEstimate:
    """The estimate for `cfg` (a RunConfig) on `device`, with weights in `dtype`."""
    import torch

    from tunelab.methods import get_method

    trainable, total, config = count_with_method(model_path, cfg.method, cfg.model.trust_remote_code)
    method = get_method(cfg.method.name)
    weight_bytes: float = dtype_bytes(dtype)
    if method.quantized_base:  # quantized linears + constants; embeddings and norms stay in 16/32 bits
        weight_bytes = method.base_weight_bytes(cfg.method)
    trainable_bytes = dtype_bytes(dtype) if method.trains_base_weights else 4  # peft keeps adapters in fp32
    cast_to = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision or "", dtype)
    params = ParameterBytes(trainable, total, weight_bytes, trainable_bytes)
    step = StepShape(tokens_per_step, dtype_bytes(dtype), cfg.train.gradient_checkpointing, autocast=cast_to != dtype)
    return estimate_memory(config, params, step, device)


def available_memory(device: str) -> float | None:
    """Bytes free now on the device (RAM for cpu/mps, the GPU's free memory for cuda); None if unknown."""
    if device == "cuda":
        import torch

        free, _total = torch.cuda.mem_get_info()
        return float(free)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import os

        return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def check_fits(estimate: MemoryEstimate, max_memory_gb: float | None, device: str) -> None:
    """Fail before training when the estimate exceeds train.max_memory_gb or, clearly, what the device has."""
    hint = ("lower train.batch_size (and raise train.grad_accum to keep the global batch), lower data.cutoff_len, "
            "turn on train.gradient_checkpointing, or use method lora/qlora")
    if max_memory_gb is not None and estimate.total > max_memory_gb * GB:
        raise TunelabError(f"{estimate.describe()}\nthis exceeds train.max_memory_gb = {max_memory_gb}; {hint}")
    free = available_memory(device)
    if free is None:
        return
    if estimate.total > OBVIOUSLY_TOO_BIG * free:
        raise TunelabError(f"{estimate.describe()}\nonly {free / GB:.2f} GB is free on {device}; {hint}")
    if estimate.total > free:
        log.warning("the memory estimate (%.2f GB) exceeds the %.2f GB free on %s", estimate.total / GB,
                    free / GB, device)
