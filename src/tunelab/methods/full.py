"""Stage 3 (method): full fine-tuning, every parameter trained."""

from __future__ import annotations


def apply_full(model, _cfg):
    for param in model.parameters():
        param.requires_grad_(True)
    return model


def _methods():
    from tunelab.config.schema import FullConfig
    from tunelab.methods import Method

    return [Method("full", apply_full, FullConfig, trains_base_weights=True, description="every weight trained")]


METHODS = _methods()
