"""Patch: a custom attention function and its mask builder registered with transformers (packed attention).

What: training/speed.py's per-example attention (`packed_sdpa_attention`) is registered under its own name with
`AttentionInterface.register` and `AttentionMaskInterface.register` (public), so a model switched to it with
`set_attn_implementation` calls it in every layer. What is not public: the keyword arguments transformers passes
to an attention function (`position_ids`, `sliding_window`, sdpa's `dropout`/`scaling`), the call signature of a mask
builder (`q_length`, `kv_length`, `q_offset`, `kv_offset`, `attention_mask`), and `sdpa_mask`, which builds the mask
whenever one is needed (padding, a cache).
Checked: transformers 5.x (tested 5.24.0). Outside that range nothing is registered and the model keeps sdpa, whose
dense block-diagonal mask gives the same result, slower (speed.use_packed_attention reports it as off).
"""

from __future__ import annotations

from collections.abc import Callable

from tunelab.patches import TRANSFORMERS, skip_outside_range


def register_attention(name: str, attention: Callable) -> bool:
    """Register `attention` as `name` with its mask builder (idempotent); False when the version gate says no."""
    if skip_outside_range(TRANSFORMERS, "per-example packed attention (train.packed_attention)"):
        return False
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    if name not in AttentionInterface():
        AttentionInterface.register(name, attention)
        ALL_MASK_ATTENTION_FUNCTIONS.register(name, packed_mask)
    return True


# the signature is transformers' mask-function interface (ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask's keywords),
# hence its 7 parameters (tests/test_architecture.py allows it by name)
def packed_mask(*args, attention_mask=None, q_length=None, kv_length=None, q_offset=0, kv_offset=0, **kwargs):
    """Mask builder paired with the packed attention function: no mask at all when there is nothing to mask but
    causality and packing (both handled by the attention function); sdpa's dense mask otherwise (padding, caches)."""
    from transformers.masking_utils import sdpa_mask

    plain = q_length == kv_length and not q_offset and not kv_offset
    if plain and (attention_mask is None or bool(attention_mask.all())):
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, q_length=q_length, kv_length=kv_length,
                     q_offset=q_offset, kv_offset=kv_offset, **kwargs)
