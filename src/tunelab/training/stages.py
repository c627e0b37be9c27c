"""Stage 4 (training): the stage registry. `tunelab train` runs `get_stage(cfg.stage).run(cfg, ...)`.

A stage says which data it trains on ("sft": conversations with trained spans; "paired": prompt + chosen +
rejected; "unpaired": prompt + one completion + a desirable/undesirable label), whether it needs a reference model,
and which metric keys it logs besides the loss. Adding a stage is one `register_stage` call; nothing heavy is
imported here (the config validates `stage` against this registry).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from tunelab.registry import Registry

DataKind = Literal["sft", "paired", "unpaired"]


@dataclass(frozen=True)
class Stage:
    name: str
    data: DataKind
    needs_reference: bool
    run: Callable[..., Any]  # (cfg: RunConfig, resume=False, callbacks=None, echo=True) -> RunResult
    metric_keys: tuple[str, ...] = ()
    description: str = ""


STAGES: Registry[Stage] = Registry("stage", sort=True)


def register_stage(stage: Stage) -> Stage:
    return STAGES.register(stage)


def get_stage(name: str) -> Stage:
    return STAGES.get(name)


def known_stages() -> list[str]:
    return STAGES.names()


def _lazy(module: str, function: str) -> Callable[..., Any]:
    """The stage's entry point, imported when the stage runs (torch/trl stay unimported until then)."""

    def run(*args, **kwargs):
        import importlib

        return getattr(importlib.import_module(module), function)(*args, **kwargs)

    run.__qualname__ = f"{module}.{function}"
    return run


REWARD_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins")
LOGP_KEYS = ("logps/chosen", "logps/rejected")


def _register_builtin() -> None:
    align = "tunelab.training.align"
    for stage in (
        Stage("sft", "sft", False, _lazy("tunelab.training.sft", "train"),
              description="supervised fine-tuning on conversations (the trained spans of data/encode.py)"),
        Stage("dpo", "paired", True, _lazy(align, "train_dpo"), REWARD_KEYS + LOGP_KEYS,
              "Direct Preference Optimization (TRL DPOTrainer; align.loss_type: sigmoid, ipo, hinge, robust...)"),
        Stage("orpo", "paired", False, _lazy(align, "train_orpo"), REWARD_KEYS + LOGP_KEYS + ("log_odds_ratio",),
              "odds-ratio preference optimization: SFT + preference in one loss, no reference (TRL ORPOTrainer)"),
        Stage("simpo", "paired", False, _lazy(align, "train_simpo"), REWARD_KEYS + LOGP_KEYS,
              "SimPO: length-normalised reward with a target margin, no reference (TRL CPOTrainer, loss simpo)"),
        Stage("kto", "unpaired", True, _lazy(align, "train_kto"), REWARD_KEYS + LOGP_KEYS + ("kl",),
              "Kahneman-Tversky Optimization on desirable/undesirable single replies (TRL KTOTrainer)"),
        Stage("rm", "paired", False, _lazy(align, "train_rm"), ("rewards/accuracies", "rewards/margins"),
              "reward model: a value head scoring chosen above rejected (TRL RewardTrainer)"),
    ):
        register_stage(stage)


_register_builtin()
