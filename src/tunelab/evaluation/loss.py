"""Evaluation stage: mean loss and perplexity over the trained (assistant) tokens, measured like training.

Examples are encoded by the data stage's `encode_conversation` with the run's template, cutoff and train_on, so the
tokens scored here are exactly the tokens training put loss on; batches are padded by the training collator.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tunelab.data.encode import EncodeSettings
from tunelab.data.types import Conversation
from tunelab.errors import DataError


@dataclass
class LossResult:
    loss: float  # mean negative log-likelihood per trained token (token-weighted over the whole set)
    perplexity: float  # exp(loss)
    tokens: int  # trained tokens scored
    per_example: list[float | None]  # mean NLL per example, None where nothing was left to score

    def metrics(self) -> dict[str, float]:
        return {"loss": self.loss, "perplexity": self.perplexity, "eval_tokens": float(self.tokens)}


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row sum of next-token NLL over labelled positions, and per-row label counts (labels are unshifted:
    position t predicts labels[t + 1], as in transformers). Computed in float32 whatever the model dtype."""
    logits = logits[:, :-1, :].float()
    target = labels[:, 1:].to(logits.device)
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, ignore_index=-100, reduction="none")
    mask = target != -100
    return (nll * mask).sum(dim=1), mask.sum(dim=1)


def encode_all(conversations: Sequence[Conversation], template, tokenizer,
               settings: EncodeSettings) -> list[dict | None]:
    from tunelab.data.encode import encode_conversation

    return [encode_conversation(c, template, tokenizer, settings.cutoff_len, settings.train_on) for c in conversations]


def compute_loss(model, tokenizer, template, conversations: Sequence[Conversation],
                 settings: EncodeSettings | None = None, batch_size: int = 8) -> LossResult:
    """Loss and perplexity of `model` on `conversations`, batched (similar lengths together, less padding).

    `settings`: the cutoff_len and train_on training used, so the scored tokens are the trained ones (one
    example per conversation: a long document is truncated, never chunked). None: cutoff_len 1024, all replies."""
    from tunelab.data.collate import padding_collator

    settings = settings or EncodeSettings(1024)
    cutoff_len, train_on = settings.cutoff_len, settings.train_on
    encoded = encode_all(conversations, template, tokenizer, settings)
    usable = [i for i, e in enumerate(encoded) if e is not None and any(x != -100 for x in e["labels"][1:])]
    if not usable:
        raise DataError(f"none of the {len(conversations)} evaluation examples has a trained token left after "
                        f"encoding (cutoff_len={cutoff_len}, train_on={train_on}); nothing to compute a loss on")
    collate = padding_collator(tokenizer)
    device = next(model.parameters()).device
    order = sorted(usable, key=lambda i: len(encoded[i]["input_ids"]))
    per_example: list[float | None] = [None] * len(conversations)
    total_nll, total_tokens = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                chunk = order[start:start + batch_size]
                batch = collate([{"input_ids": encoded[i]["input_ids"], "labels": encoded[i]["labels"]}
                                 for i in chunk])
                sums, counts = _forward(model, batch, device)
                for i, s, n in zip(chunk, sums.tolist(), counts.tolist()):
                    per_example[i] = s / n if n else None
                total_nll += float(sums.sum())
                total_tokens += int(counts.sum())
    finally:
        model.train(was_training)
    loss = total_nll / total_tokens
    return LossResult(loss, math.exp(min(loss, 700.0)), total_tokens, per_example)


def _forward(model, batch: dict, device) -> tuple[torch.Tensor, torch.Tensor]:
    # use_cache=False: with a cache the model skips the packed-sequence detection (docs/pitfalls.md #1) and a
    # cache is wasted work for a single forward anyway.
    inputs = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}
    logits = model(**inputs, use_cache=False).logits
    return token_nll(logits, batch["labels"])
