"""Stage 3 (method): P-Tuning v2 / prefix tuning, trained key/value prefixes in every layer (peft PrefixTuning).

With `projection` (P-Tuning v2) the prefixes come from an MLP during training; peft saves the projected
prefixes, so the saved adapter loads for inference without the MLP and gives the same logits.
"""

from __future__ import annotations


def peft_prefix_config(cfg):
    from peft import PrefixTuningConfig

    # peft sizes the MLP like the model's hidden size when encoder_hidden_size is left out.
    kwargs = {"encoder_hidden_size": cfg.encoder_hidden_size} if cfg.encoder_hidden_size else {}
    return PrefixTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=cfg.num_virtual_tokens,
        prefix_projection=cfg.projection,
        **kwargs,
    )


def apply_prefix(model, cfg):
    from peft import get_peft_model

    return get_peft_model(model, peft_prefix_config(cfg))


def _methods():
    from tunelab.config.schema import PrefixConfig
    from tunelab.methods import Method

    # The prefix is passed to the model as a KV cache; transformers only detects packed sequences when no cache
    # is passed (docs/pitfalls.md #1), so packed examples would attend to each other: pad instead. Checkpointed
    # layers drop past_key_values, and the prefix IS past_key_values. peft cannot fold a prefix into the weights.
    return [Method("prefix", apply_prefix, PrefixConfig, description="P-Tuning v2 / prefix tuning",
                   summary_keys=("num_virtual_tokens",), is_adapter=True, supports_packing=False,
                   supports_gradient_checkpointing=False)]


METHODS = _methods()
