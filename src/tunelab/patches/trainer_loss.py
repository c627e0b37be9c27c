"""Patch: Trainer attributes read by tunelab's trained-token loss (`TunelabTrainer.compute_loss`).

What: `compute_loss` is the Trainer's documented override point, but deciding whether it may be replaced by
tunelab's loss (training/speed.py `trained_token_loss`) reads attributes the Trainer sets in `__init__` and does not
document: `label_smoother`, `compute_loss_func`, `compute_metrics` (anything that needs the Trainer's own loss or the
full logits) and `model_accepts_loss_kwargs` (whether `num_items_in_batch` is the divisor the Trainer expects).
Checked: transformers 5.x (tested 5.24.0). Outside that range the Trainer's own `compute_loss` is used: the same
loss, computed from every position's logits (slower, more memory), so nothing becomes wrong.
"""

from __future__ import annotations

from tunelab.patches import TRANSFORMERS, skip_outside_range


def own_loss_allowed(trainer, inputs: dict) -> bool:
    """True when the trained-token loss gives what the Trainer's compute_loss would."""
    if "labels" not in inputs or skip_outside_range(TRANSFORMERS, "the trained-token loss (sparse_logits)"):
        return False
    return trainer.label_smoother is None and trainer.compute_loss_func is None and trainer.compute_metrics is None


def loss_divisor(trainer, num_items_in_batch):
    """The token count the Trainer divides the summed loss by (None: this batch's own count)."""
    return num_items_in_batch if trainer.model_accepts_loss_kwargs else None


def scale_for_processes(trainer, loss, count):
    """As the Trainer does with average_tokens_across_devices: DDP averages the gradients, so scale the loss back."""
    if trainer.args.average_tokens_across_devices and trainer.model_accepts_loss_kwargs and count is not None:
        return loss * trainer.accelerator.num_processes
    return loss
