"""Say what a model argument points at (run directory, adapter, exported folder, HF folder, hub id, GGUF).

Chat, evaluation, export and serving all accept the same strings; this module turns one into the base model to
load, the adapter to apply on it, and the tokenizer whose chat template was used in training. A run folder is
read through `tunelab.runs.rundir` (its layout lives there); nothing heavy is loaded here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tunelab.config.schema import ModelConfig, RunConfig
from tunelab.errors import TunelabError
from tunelab.models.resolve import resolve_model_path
from tunelab.runs.read import read_run_config
from tunelab.runs.rundir import RunDir, is_run_dir

# Written by tunelab export next to a base model when an adapter cannot be merged into it (prefix tuning).
EXPORT_MARKER = "tunelab_export.json"


@dataclass
class Artifact:
    """Everything needed to load one model for inference."""

    name: str  # what the engine reports (run name, folder name or hub id)
    model_cfg: ModelConfig  # how to load the base (or full) model
    base_path: Path  # local folder with config.json and weights
    adapter_path: Path | None  # PEFT adapter applied on the base, or None
    tokenizer_path: Path  # folder whose tokenizer carries the training chat template
    template_file: Path | None = None  # run's chat_template.jinja, used when the tokenizer has no template
    run_dir: Path | None = None
    run_config: RunConfig | None = None


def is_adapter_dir(path: Path) -> bool:
    return path.is_dir() and (path / "adapter_config.json").is_file()


def has_tokenizer(path: Path) -> bool:
    return any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))


def adapter_base_name(adapter: Path) -> str:
    try:
        data = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise TunelabError(f"{adapter / 'adapter_config.json'}: cannot read the adapter config ({e})") from None
    base = data.get("base_model_name_or_path")
    if not base:
        raise TunelabError(
            f"{adapter / 'adapter_config.json'}: field base_model_name_or_path is empty; pass the base model "
            "explicitly (tunelab chat BASE --adapter ADAPTER)"
        )
    return str(base)


def resolve_artifact(model: str | ModelConfig, adapter: str | None = None, *, device: str = "auto",
                     dtype: str = "auto") -> Artifact:
    """Classify `model` (and an optional explicit `adapter`) into an Artifact; nothing heavy is loaded.

    `model` may be a command's model section whose `name` is any of the strings above: its device, dtype and
    quantize (bitsandbytes inference, models/quantized.py) then apply to what is loaded."""
    if isinstance(model, ModelConfig):
        art = resolve_artifact(model.name, adapter, device=model.device, dtype=model.dtype)
        art.model_cfg.quantize = model.quantize
        return art
    path = Path(model).expanduser()
    if is_run_dir(path):
        art = _from_run_dir(path, device, dtype)
    elif is_adapter_dir(path):
        base_cfg = _model_cfg(adapter_base_name(path), device, dtype)
        tok = path if has_tokenizer(path) else resolve_model_path(base_cfg)
        art = Artifact(path.name, base_cfg, resolve_model_path(base_cfg), path, tok)
    else:
        cfg = _model_cfg(model, device, dtype)
        base = resolve_model_path(cfg)
        art = Artifact(path.name if path.exists() else model, cfg, base, _exported_adapter(base), base)
    if adapter is not None:
        if art.adapter_path is not None:
            raise TunelabError(f"{model} already carries an adapter ({art.adapter_path}); give only one adapter")
        adapter_path = Path(adapter).expanduser()
        if not is_adapter_dir(adapter_path):
            raise TunelabError(f"--adapter {adapter}: no adapter_config.json there (not a PEFT adapter folder)")
        art.adapter_path = adapter_path
        if has_tokenizer(adapter_path):  # the adapter's tokenizer carries its training template
            art.tokenizer_path = adapter_path
        art.name = f"{art.name}+{adapter_path.name}"
    return art


def _model_cfg(name: str, device: str, dtype: str, base: ModelConfig | None = None) -> ModelConfig:
    data = base.model_dump() if base is not None else {}
    data.update(name=name)
    if base is None or device != "auto":
        data["device"] = device
    if base is None or dtype != "auto":
        data["dtype"] = dtype
    return ModelConfig(**data)


def _from_run_dir(run_dir: Path, device: str, dtype: str) -> Artifact:
    cfg = read_run_config(run_dir)
    final = RunDir(run_dir).final
    if not final.is_dir():
        raise TunelabError(_no_final_message(run_dir))
    template_file = RunDir(run_dir).template_file
    template_file = template_file if template_file.is_file() else None
    if is_adapter_dir(final):
        # The run's model section is authoritative for the base: it keeps gguf_file, revision, remote code.
        # A QLoRA run's base is loaded unquantized here: inference does not need the 4-bit training layout.
        base_cfg = _model_cfg(cfg.model.name, device, dtype, base=cfg.model)
        tok = final if has_tokenizer(final) else resolve_model_path(base_cfg)
        return Artifact(run_dir.name, base_cfg, resolve_model_path(base_cfg), final, tok, template_file, run_dir, cfg)
    if (final / "config.json").is_file():
        full_cfg = _model_cfg(str(final), device, dtype, base=cfg.model)
        full_cfg.gguf_file = None
        return Artifact(run_dir.name, full_cfg, final, None, final, template_file, run_dir, cfg)
    raise TunelabError(f"{final}: neither an adapter (adapter_config.json) nor a model (config.json)")


def _no_final_message(run_dir: Path) -> str:
    """Name the newest checkpoint when there is one; otherwise say how to train or resume the run."""
    run = RunDir(run_dir)
    latest = run.latest_checkpoint()
    head = f"{run_dir} has no final/ folder (training not finished?)"
    if latest is not None:
        return (f"{head}; point at a checkpoint instead, e.g. {latest}, or finish training with "
                f"`tunelab train {run_dir} --resume`")
    return (f"{head}, and it has no checkpoint in {run.checkpoints} either: train it with "
            f"`tunelab train {run.config_file}` (or `tunelab train {run_dir} --resume` to continue an "
            "interrupted run once it has saved a checkpoint)")


def _exported_adapter(folder: Path) -> Path | None:
    """An exported folder that could not be merged (prefix tuning) names its adapter in tunelab_export.json."""
    marker = folder / EXPORT_MARKER
    if not marker.is_file():
        return None
    info = json.loads(marker.read_text(encoding="utf-8"))
    name = info.get("adapter")
    return folder / name if name else None
