"""Patch: peft LoRA/DoRA layers, three ways (the bf16 and CPU speed options of training/speed.py).

What and why:
- `keep_adapter_outputs_fp32`: a forward hook on the frozen layer inside each adapted layer (`get_base_layer()`)
  returns its output in fp32. It relies on peft's LoRA forward computing `result = base_layer(x)`, adding the
  adapter's output to it and casting the sum back to `result`'s dtype: with an fp32 `result` a small adapter update
  survives the sum under bf16 autocast. The hooks are removed when the caller's ExitStack closes.
- `swap_lora_dropout`: replaces the `nn.Dropout` modules of peft's `lora_dropout` ModuleDict (one per adapter, applied
  to the layer's input before `lora_A`) with another module; swapped back when the ExitStack closes.
- `disable_input_casting`: peft's own `peft.helpers.disable_input_dtype_casting` (sets `cast_input_dtype_enabled` on
  every BaseTunerLayer, restored on exit), entered on the caller's ExitStack.
- `fuse_lora_linear`: gives each plain LoRA `Linear` (exactly peft's class) a subclass whose forward adds the adapter
  in one `addmm` into the frozen layer's output (`result + B(A(dropout(x))) * scaling` costs three passes over the
  output, forward, and one more backward). It relies on the attributes peft's forward reads (`lora_A`, `lora_B`,
  `lora_dropout`, `scaling`, `lora_variant`, `active_adapters`, `merged`, `disable_adapters`, `base_layer`) and
  falls back to peft's own forward for anything else (several adapters, DoRA, a bias on B, autocast, mixed
  dtypes). The instance's class is set back when the ExitStack closes; the state dict is unchanged.
Checked: peft 0.17 to 0.x (tested 0.21.2). Outside that range nothing is patched and the function returns 0, so
the speed plan reports the option as off and training runs peft's unpatched path (same tokens, same loss).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack

import torch

from tunelab.patches import PEFT, skip_outside_range

HOOKED = "_tunelab_fp32_output"  # set on a base layer while our hook is on it: one hook per layer


def tuner_layers(model) -> list:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def _fp32_output(_module, _inputs, output):
    return output.float() if torch.is_tensor(output) and output.dtype in (torch.bfloat16, torch.float16) else output


def keep_adapter_outputs_fp32(model, undo: ExitStack) -> int:
    """Hook every adapted layer's frozen base layer to return fp32; returns the number of adapted layers."""
    if skip_outside_range(PEFT, "fp32 adapter outputs (train.fp32_adapter_output)"):
        return 0
    layers = tuner_layers(model)
    for layer in layers:
        base = layer.get_base_layer()
        if getattr(base, HOOKED, False):
            continue
        handle = base.register_forward_hook(_fp32_output)
        setattr(base, HOOKED, True)
        undo.callback(_unhook, base, handle)
    return len(layers)


def _unhook(base, handle) -> None:
    handle.remove()
    if hasattr(base, HOOKED):
        delattr(base, HOOKED)


def swap_lora_dropout(model, make: Callable[[float], torch.nn.Module], undo: ExitStack) -> int:
    """Replace each `nn.Dropout(p > 0)` of peft's `lora_dropout` tables with `make(p)`; returns the count."""
    if skip_outside_range(PEFT, "fast LoRA dropout (train.fast_dropout)"):
        return 0
    swapped = 0
    for module in model.modules():
        table = getattr(module, "lora_dropout", None)
        if not isinstance(table, torch.nn.ModuleDict):
            continue
        for name, dropout in list(table.items()):
            if type(dropout) is torch.nn.Dropout and dropout.p > 0:
                table[name] = make(dropout.p)
                undo.callback(table.__setitem__, name, dropout)
                swapped += 1
    return swapped


def disable_input_casting(model, undo: ExitStack) -> int:
    """peft's `disable_input_dtype_casting` until `undo` closes; returns the number of tuner layers."""
    if skip_outside_range(PEFT, "uncast LoRA inputs (train.bf16_frozen_base)"):
        return 0
    from peft.helpers import disable_input_dtype_casting

    undo.enter_context(disable_input_dtype_casting(model))
    return len(tuner_layers(model))


def fuse_lora_linear(model, undo: ExitStack) -> int:
    """Switch every plain peft LoRA Linear to the fused-add forward (FusedLoraLinear) until `undo` closes; returns
    the count."""
    if skip_outside_range(PEFT, "fused LoRA add (train.fused_lora)"):
        return 0
    from peft.tuners.lora.layer import Linear

    fused_class = _fused_class(Linear)
    swapped = 0
    for module in model.modules():
        if type(module) is Linear:
            module.__class__ = fused_class
            undo.callback(setattr, module, "__class__", Linear)
            swapped += 1
    return swapped


_FUSED: dict[type, type] = {}


def _fused_class(linear: type) -> type:
    """FusedLoraLinear, a subclass of peft's lora Linear (made once; peft is imported only when used)."""
    if linear not in _FUSED:

        def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            adapter = _fusable(self, x, args, kwargs)
            if adapter is None:
                return linear.forward(self, x, *args, **kwargs)
            return _fused_add(self, x, adapter)

        _FUSED[linear] = type("FusedLoraLinear", (linear,), {"forward": forward, "__module__": __name__})
    return _FUSED[linear]


def _fused_add(layer, x: torch.Tensor, adapter: str) -> torch.Tensor:
    """base(x) + scaling * A(dropout(x)) @ B.T with the sum written once by addmm (what peft's forward computes as
    a product, a scaled copy and a sum). A dropout module with `split_scale` (tunelab's FastDropout) only zeroes the
    dropped inputs and its 1 / (1 - p) joins the addmm's alpha: one pass over the input fewer, forward and back."""
    result = layer.base_layer(x)
    dropout = layer.lora_dropout[adapter]
    dropped, scale = dropout.split_scale(x) if hasattr(dropout, "split_scale") else (dropout(x), 1.0)
    low = layer.lora_A[adapter](dropped)
    width = result.shape[-1]
    fused = torch.addmm(result.reshape(-1, width), low.reshape(-1, low.shape[-1]), layer.lora_B[adapter].weight.t(),
                        alpha=layer.scaling[adapter] * scale)
    return fused.view(result.shape)


def _fusable(layer, x: torch.Tensor, args: tuple, kwargs: dict) -> str | None:
    """The one active adapter when the fused forward computes exactly what peft's does, else None."""
    if args or kwargs or layer.disable_adapters or layer.merged or len(layer.active_adapters) != 1:
        return None
    adapter = layer.active_adapters[0]
    if adapter not in layer.lora_A or adapter in layer.lora_variant:  # DoRA and other variants: peft's path
        return None
    if torch.is_autocast_enabled(x.device.type):  # autocast decides the matmul dtypes: peft's path
        return None
    lora_a, lora_b = layer.lora_A[adapter], layer.lora_B[adapter]
    if lora_b.bias is not None or type(lora_a) is not torch.nn.Linear or type(lora_b) is not torch.nn.Linear:
        return None
    dtype = x.dtype
    if lora_a.weight.dtype != dtype or lora_b.weight.dtype != dtype or layer.get_base_layer().weight.dtype != dtype:
        return None
    return adapter
