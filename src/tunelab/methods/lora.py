"""Stage 3 (method): LoRA and DoRA adapters through peft; also the adapter half of QLoRA (qlora.py)."""

from __future__ import annotations

from pathlib import Path

from tunelab.errors import TunelabError


def peft_lora_config(cfg, task_type: str = "CAUSAL_LM"):
    """tunelab's LoraConfig / DoraConfig / QLoraConfig section -> peft.LoraConfig."""
    from peft import LoraConfig as PeftLoraConfig

    from tunelab.config.schema import DoraConfig

    return PeftLoraConfig(
        task_type=task_type,
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
        use_rslora=cfg.rslora,
        use_dora=isinstance(cfg, DoraConfig),
        modules_to_save=list(cfg.modules_to_save) or None,
    )


def load_initial_adapter(model, path: str):
    """Start a NEW run from an existing adapter (method.init_from): its weights, trainable again."""
    from peft import PeftModel

    from tunelab.runs.rundir import adapter_folder

    folder = adapter_folder(Path(path).expanduser())  # a run folder: its final adapter (SFT -> DPO)
    if not (folder / "adapter_config.json").is_file():
        raise TunelabError(
            f"method.init_from: {folder} has no adapter_config.json; point it at a run's final/ folder or a "
            "checkpoint folder holding a PEFT adapter"
        )
    try:
        return PeftModel.from_pretrained(model, str(folder), is_trainable=True)
    except Exception as e:  # shape mismatches when the adapter was trained on another base model
        raise TunelabError(f"method.init_from: cannot load the adapter in {folder} on this model: {e}") from e


def task_type(model) -> str:
    """SEQ_CLS for a reward model (a value head; peft then also trains and saves its `score` head), else CAUSAL_LM."""
    return "SEQ_CLS" if type(model).__name__.endswith("ForSequenceClassification") else "CAUSAL_LM"


def apply_lora(model, cfg):
    from peft import get_peft_model

    if cfg.init_from:
        return load_initial_adapter(model, cfg.init_from)
    try:
        return get_peft_model(model, peft_lora_config(cfg, task_type(model)))
    except ValueError as e:  # e.g. target modules that do not exist in this architecture
        raise TunelabError(f"method.target_modules: {e}") from e


def _methods():
    from tunelab.config.schema import DoraConfig, LoraConfig
    from tunelab.methods import Method

    adapter = {"summary_keys": ("r", "alpha"), "is_adapter": True, "mergeable": True, "lora_layers": True}
    return [
        Method("lora", apply_lora, LoraConfig, description="low-rank adapters on the chosen linear layers", **adapter),
        Method("dora", apply_lora, DoraConfig, description="weight-decomposed LoRA (magnitude + direction)",
               **adapter),
    ]


METHODS = _methods()
