"""Batching encoded examples for training: dynamic padding, or padding-free packing (last step of the data stage).

Packing puts a batch's examples end to end in one row with position_ids restarting at 0 per example and no
attention_mask; transformers then keeps attention inside each example (flash-attention varlen on GPU, a block-
causal mask for sdpa/eager). That detection only happens when no KV cache is built: the model must run with
use_cache=False (Trainer does this; plain loops must do it themselves - docs/pitfalls.md #1).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

IGNORE = -100


class PaddingCollator:
    """Right-pad input_ids with pad_token_id and labels with -100; attention_mask marks the real tokens.

    Labels are padded by position, never derived from pad ids, so pad == eos cannot hide the eos the model learns.
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        if pad_token_id is None:
            raise ValueError("PaddingCollator needs a pad_token_id (tunelab.models.load.load_tokenizer sets one)")
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, examples: Sequence[dict]) -> dict[str, torch.Tensor]:
        longest = max(len(e["input_ids"]) for e in examples)
        if self.pad_to_multiple_of:
            longest = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        n = len(examples)
        input_ids = torch.full((n, longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((n, longest), IGNORE, dtype=torch.long)
        attention_mask = torch.zeros((n, longest), dtype=torch.long)
        for row, e in enumerate(examples):
            k = len(e["input_ids"])
            input_ids[row, :k] = torch.as_tensor(e["input_ids"], dtype=torch.long)
            labels[row, :k] = torch.as_tensor(_labels(e), dtype=torch.long)
            attention_mask[row, :k] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


class PackingCollator:
    """Concatenate examples into one row; position_ids restart per example and no attention_mask is returned.

    The first label of every example is set to -100: in the flat row the previous example's last token would
    otherwise be trained to predict it, a prediction that does not exist in the padded batch.
    """

    def __call__(self, examples: Sequence[dict]) -> dict[str, torch.Tensor]:
        ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        for e in examples:
            k = len(e["input_ids"])
            ids += list(e["input_ids"])
            labels += [IGNORE] + list(_labels(e))[1:]
            positions += range(k)
        return {
            "input_ids": torch.tensor([ids], dtype=torch.long),
            "labels": torch.tensor([labels], dtype=torch.long),
            "position_ids": torch.tensor([positions], dtype=torch.long),
        }


def _labels(example: dict) -> Sequence[int]:
    labels = example.get("labels")
    return example["input_ids"] if labels is None else labels


def make_collator(packing: bool, pad_token_id: int, pad_to_multiple_of: int | None = None):
    """The collator data.packing asks for."""
    return PackingCollator() if packing else PaddingCollator(pad_token_id, pad_to_multiple_of)
