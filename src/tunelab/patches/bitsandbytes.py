"""Patch: bitsandbytes `Linear4bit.support_avx512bf16_for_cpu` (QLoRA on CPU).

What: the per-layer flag is set to False on every 4-bit layer on CPU. Why: on CPUs with AVX-512 BF16, a no-grad
eval-mode forward (evaluation, generate) converts Linear4bit weights to an inference-only layout that `.train()` does
not undo; backprop then runs through a kernel without autograd and the adapters below stop learning (docs/pitfalls.md
#2). The flag is an undocumented attribute of bitsandbytes' layer.
Checked: bitsandbytes 0.50 to 0.x (tested 0.50.2). Outside that range QLoRA on a CPU is refused: unpatched, it can
train nothing without any error.
"""

from __future__ import annotations

from tunelab.patches import BITSANDBYTES, require_checked

FLAG = "support_avx512bf16_for_cpu"


def keep_cpu_weights_trainable(model) -> int:
    """Stop bitsandbytes from repacking 4-bit CPU weights for inference; returns the layers changed."""
    import bitsandbytes as bnb

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit) and m.weight.device.type == "cpu"]
    if layers:
        require_checked(BITSANDBYTES, "QLoRA on CPU (4-bit weights kept in their trainable layout)")
    changed = 0
    for module in layers:
        if getattr(module, FLAG, False):
            setattr(module, FLAG, False)
            changed += 1
    return changed
