"""Stage 3 (method): freeze tuning, train only the last N decoder layers and/or named modules."""

from __future__ import annotations

from tunelab.errors import TunelabError


def decoder_layers(model):
    """The ModuleList of transformer blocks (model.model.layers for llama/qwen/mistral/gemma, others by size)."""
    from torch import nn

    expected = getattr(model.config, "num_hidden_layers", None)
    candidates = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    for name, module in candidates:
        if len(module) == expected:
            return name, module
    if candidates:  # configs without num_hidden_layers: the longest list of blocks
        return max(candidates, key=lambda item: len(item[1]))
    raise TunelabError(f"freeze: cannot find the decoder layers of {type(model).__name__}")


def apply_freeze(model, cfg):
    for param in model.parameters():
        param.requires_grad_(False)
    trained: list[str] = []
    if cfg.trainable_layers:
        prefix, layers = decoder_layers(model)
        if cfg.trainable_layers > len(layers):
            raise TunelabError(
                f"method.trainable_layers: {cfg.trainable_layers} is more than the model's {len(layers)} layers"
            )
        first = len(layers) - cfg.trainable_layers
        for index in range(first, len(layers)):
            for param in layers[index].parameters():
                param.requires_grad_(True)
        trained.append(f"{prefix}.{first}-{len(layers) - 1}")
    for pattern in cfg.trainable_modules:
        hits = [p for name, p in model.named_parameters() if pattern in name]
        if not hits:
            sample = ", ".join(sorted({n.rsplit(".", 1)[0] for n, _ in model.named_parameters()})[:12])
            raise TunelabError(
                f"method.trainable_modules: no parameter name contains {pattern!r}; names look like: {sample}"
            )
        for param in hits:
            param.requires_grad_(True)
    if not trained and not cfg.trainable_modules:
        raise TunelabError("method freeze: set trainable_layers > 0 and/or trainable_modules, else nothing trains")
    return model


def _methods():
    from tunelab.config.schema import FreezeConfig
    from tunelab.methods import Method

    return [Method("freeze", apply_freeze, FreezeConfig, trains_base_weights=True, summary_keys=("trainable_layers",),
                   description="last N layers / named modules")]


METHODS = _methods()
