"""Guard: a packed batch must never meet a KV cache (transformers' packed-sequence detection, docs/pitfalls.md #1).

What: for sdpa/eager, transformers finds the examples of a packed row from position_ids only when attention_mask is
None AND no cache exists (`masking_utils._preprocess_mask_arguments`: "only if ... we don't have cache, i.e.
generally a training setup"). A model whose config says use_cache=True builds a DynamicCache even in training, the
detection is skipped, and the packed examples attend to each other without any error (loss 6.20 instead of 7.13
on SmolLM2). `refuse_packed_batches_with_cache` registers a forward pre-hook (a public torch API) on the decoder that
raises `PackedBatchError` when a packed batch (cu_seq_lens_q given, or position_ids restarting inside a row with no
attention_mask) comes in while a cache would be built or used. The hook is removed when the caller's ExitStack closes.
Checked: transformers 5.x (tested 5.24.0); tests/test_patches.py fails when transformers stops skipping the detection
with a cache (then the guard could go) or stops detecting packed rows at all (then packing needs another mask).
The guard is applied whatever the version: it only refuses, it never changes a computation.
"""

from __future__ import annotations

from contextlib import ExitStack

import torch

from tunelab.errors import TunelabError


class PackedBatchError(TunelabError):
    pass


def is_packed(kwargs: dict) -> bool:
    """True for a batch whose rows hold several examples told apart by their boundaries, not by a mask."""
    if kwargs.get("cu_seq_lens_q") is not None:
        return True
    position_ids = kwargs.get("position_ids")
    if kwargs.get("attention_mask") is not None or not torch.is_tensor(position_ids) or position_ids.dim() != 2:
        return False
    return position_ids.shape[1] > 1 and bool((torch.diff(position_ids, dim=1) != 1).any())


def _refuse_with_cache(module, _args, kwargs) -> None:
    if not is_packed(kwargs):
        return
    use_cache = kwargs.get("use_cache")
    if use_cache is None:
        use_cache = getattr(module.config, "use_cache", False)
    given = kwargs.get("past_key_values") is not None or kwargs.get("cache") is not None  # 5.24 renames it `cache`
    if use_cache or given:
        raise PackedBatchError(
            f"a packed batch (several examples in one row) reached {type(module).__name__} with a KV cache "
            f"(use_cache={use_cache}, cache given: {given}): "
            "transformers then lets the examples attend to each other. Run packed batches with use_cache=False "
            "(model.config.use_cache = False, or use_cache=False in the call); see docs/pitfalls.md #1")


def refuse_packed_batches_with_cache(model, undo: ExitStack) -> None:
    """Install the guard on the decoder of `model` (a causal LM, or a peft model around one) until `undo` closes."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else base
    handle = decoder.register_forward_pre_hook(_refuse_with_cache, with_kwargs=True)
    undo.callback(handle.remove)
