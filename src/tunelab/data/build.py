"""The data stage exactly as training runs it, in one call: checks -> tokenizer -> template -> prepare_data.

Training (training/sft.py), `tunelab data`, the web UI's Data tab and the demo all call `build_sft_data`, so what
they show or cache is what training trains on: the same fingerprint and the same token ids, and a tokenizer that
carries the training template (what every saved artifact is given).
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from tunelab.data.check import check_data
from tunelab.data.pipeline import PreparedData, prepare_data
from tunelab.data.templates import apply_template, resolve_template

if TYPE_CHECKING:
    from tunelab.config.schema import RunConfig


def build_sft_data(cfg: RunConfig, tokenizer=None, *, progress: bool = False, force: bool = False) -> PreparedData:
    """Prepare `cfg.data` for supervised fine-tuning of `cfg.model`; `tokenizer` is loaded from the config when
    not given. The result carries `.template` and `.tokenizer` (whose chat_template is now the training one)."""
    check_data(cfg, include_eval=False)  # every data problem at once, before a tokenizer is loaded
    if tokenizer is None:
        from tunelab.models.load import load_tokenizer  # the model stage's loader: the one training uses

        tokenizer = load_tokenizer(cfg.model)
    template = resolve_template(cfg.data.template, tokenizer, cfg.data.enable_thinking)
    apply_template(tokenizer, template)
    prepared = prepare_data(cfg.data, tokenizer, template, progress=progress, force=force)
    return replace(prepared, template=template, tokenizer=tokenizer)
