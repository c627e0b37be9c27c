"""Patch: TRL's fused lm_head scores only the trained (completion) positions on CPU too (DPO, KTO).

What: TRL 1.16's `_fused_forward` (trl/trainer/utils.py) chooses its compact path, which projects only the positions
whose label is trained, when `trl.trainer.utils._use_triton(device)` is true (CUDA, XPU); elsewhere it projects every
position, prompt and padding included, and masks the results afterwards: on CPU a 49k-column projection per prompt
token thrown away. The compact path itself is plain torch (an index, then `masked_scatter`) and gives the same
log-probs; the kernel choice is made separately (trl/kernels/chunked_logprob.py), so CPU keeps the torch kernel.
The swap of `_use_triton` is scoped to one loss call and undone after it.
Checked: trl 1.16 (tested 1.16.0). Outside that range, or when `_use_triton` is gone, nothing is swapped: TRL's
own path computes the same loss, only slower.
"""

from __future__ import annotations

import contextlib

from tunelab.patches import Checked, skip_outside_range

TRL = Checked("trl", "1.16", "1.17", "1.16.0")


@contextlib.contextmanager
def completion_only_log_probs(enabled: bool):
    """While active, TRL's fused lm_head (DPO, KTO) projects only the positions whose label is trained."""
    if not enabled or skip_outside_range(TRL, "completion-only log-probs (train.sparse_logits, DPO/KTO)"):
        yield
        return
    import trl.trainer.utils as trl_utils

    if not hasattr(trl_utils, "_use_triton"):
        yield
        return
    original = trl_utils._use_triton
    trl_utils._use_triton = lambda device: True  # read only by _fused_forward's `compact` choice
    try:
        yield
    finally:
        trl_utils._use_triton = original
