"""Batching encoded examples for training: dynamic padding, or padding-free packing (last step of the data stage).

Both are transformers' own collators, configured for tunelab's examples (`input_ids` and `labels`, -100 on every
token that is not trained):

- `padding_collator`: DataCollatorForSeq2Seq pads input_ids with the tokenizer's pad token and labels with -100 by
  position (never derived from pad ids, so pad == eos cannot hide the eos the model learns); attention_mask marks
  the real tokens.
- `packing_collator`: DataCollatorWithFlattening puts a batch's examples end to end in one row, sets the first label
  of every example to -100 (in the flat row the previous example's last token would otherwise be trained to predict
  it), and emits the example boundaries twice: position_ids restarting at 0 per example (what sdpa/eager use) and
  flash-attention's `cu_seq_lens_q/k` + `max_length_q/k` (what varlen kernels and tunelab's packed attention use).
  transformers' sdpa/eager detection of packed rows only happens when no KV cache is built: a model must run packed
  batches with use_cache=False; tunelab.patches.packing refuses a packed batch otherwise (docs/pitfalls.md #1).
"""

from __future__ import annotations

IGNORE = -100
BOUNDARY_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def padding_collator(tokenizer, pad_to_multiple_of: int | None = None):
    """Pad to the longest example of the batch (rounded up to `pad_to_multiple_of`)."""
    from transformers import DataCollatorForSeq2Seq

    if tokenizer.pad_token_id is None:
        raise ValueError("padding needs a tokenizer with a pad token (tunelab.models.load.load_tokenizer sets one)")
    return DataCollatorForSeq2Seq(tokenizer, padding=True, pad_to_multiple_of=pad_to_multiple_of,
                                  label_pad_token_id=IGNORE, return_tensors="pt")


def packing_collator():
    """One packed row per batch, with the example boundaries as position_ids and flash-attention kwargs."""
    from transformers import DataCollatorWithFlattening

    return DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE, return_flash_attn_kwargs=True)


def make_collator(packing: bool, tokenizer, pad_to_multiple_of: int | None = None):
    """The collator training uses: packed rows, or padded batches."""
    return packing_collator() if packing else padding_collator(tokenizer, pad_to_multiple_of)
