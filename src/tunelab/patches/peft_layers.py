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
