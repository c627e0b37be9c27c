"""Run folders: their layout, atomic writers, and the choice of a new run or the one to resume.

    runs/<run_name>/ config.yaml run.json env.json data.json chat_template.jinja metrics.jsonl loss.png
                     tb/ checkpoints/checkpoint-N/ final/ eval/

The names below are the only place the layout is spelled out (docs/architecture.md, "Run directory"); training
writes through `RunDir`, everything else reads through it, `artifacts` and `read`. Every file is written
atomically (temp file + rename) so a killed run never leaves half a JSON behind.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunelab.errors import TunelabError

if TYPE_CHECKING:
    from tunelab.config.schema import RunConfig

CONFIG_FILE = "config.yaml"  # the resolved config (train.run_name = the folder name)
RUN_JSON = "run.json"  # status, times, model, method, template, data fingerprint, final metrics
ENV_JSON = "env.json"  # library versions, device, git commits
DATA_JSON = "data.json"  # data stats and fingerprint
TEMPLATE_FILE = "chat_template.jinja"  # the exact template used in training
METRICS_FILE = "metrics.jsonl"  # one JSON object per log/eval event
LOSS_PLOT = "loss.png"
TB_DIR = "tb"  # TensorBoard event files
CHECKPOINTS_DIR = "checkpoints"  # checkpoint-N/ folders, each complete (see STAGING)
FINAL_DIR = "final"  # adapter or full model, with the tokenizer carrying the training template
EVAL_DIR = "eval"  # what `tunelab eval` writes for a run (eval/metrics.json)
EVAL_METRICS = "metrics.json"
EXPORT_DIR = "export"  # what `tunelab export` writes for a run by default

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE = "trainer_state.json"  # transformers' last file of a checkpoint: its presence marks it complete
STAGING = ".staging"  # checkpoints are written here, then renamed into place
ADAPTER_CONFIG = "adapter_config.json"  # peft's: an adapter folder (final/ of an adapter run, a checkpoint)


def checkpoint_name(step: int) -> str:
    """The folder name of the checkpoint saved at optimizer step `step`."""
    return f"checkpoint-{step}"


def checkpoint_step(path: Path) -> int | None:
    """The step of a checkpoint-N folder; None for any other name."""
    m = CHECKPOINT_RE.match(Path(path).name)
    return int(m.group(1)) if m else None


def complete_checkpoints(checkpoints: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint under `checkpoints`, oldest first."""
    if not checkpoints.is_dir():
        return []
    found = [(checkpoint_step(p), p) for p in checkpoints.iterdir() if p.is_dir()]
    return sorted((s, p) for s, p in found if s is not None and (p / TRAINER_STATE).is_file())


def adapter_folder(path: Path) -> Path:
    """A run folder's final adapter (the folder SFT -> DPO chains start from), else `path` itself."""
    final = Path(path) / FINAL_DIR
    return final if (final / ADAPTER_CONFIG).is_file() else Path(path)


def run_folder_config(path: Path) -> Path:
    """The resolved config.yaml of the run folder `path` (to resume or re-load it); refuses other folders."""
    config = Path(path) / CONFIG_FILE
    if not config.is_file():
        raise TunelabError(f"{path} is a folder without {CONFIG_FILE} (not a tunelab run folder)")
    return config


def is_run_dir(path: Path) -> bool:
    """A tunelab run folder: the resolved config plus anything training writes once it started (run.json,
    metrics.jsonl or final/). Half-written and failed runs count: they list, and resolving them says why they
    cannot be loaded."""
    path = Path(path)
    started = any((path / name).exists() for name in (RUN_JSON, METRICS_FILE, FINAL_DIR))
    return path.is_dir() and (path / CONFIG_FILE).is_file() and started


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: Path, data: Any) -> None:
    write_atomic(path, json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


def default_run_name(cfg: RunConfig) -> str:
    model = Path(cfg.model.name.rstrip("/")).name.replace(".gguf", "")
    model = re.sub(r"[^A-Za-z0-9._-]+", "-", model)[:40]
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{model}-{cfg.method.name}"


def latest_checkpoint(checkpoints: Path) -> Path | None:
    """The newest complete checkpoint; incomplete ones never get a checkpoint-N name (see TunelabTrainer)."""
    found = complete_checkpoints(checkpoints)
    return found[-1][1] if found else None


def git_commit(folder: Path) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, check=True)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def env_info(device: str) -> dict[str, Any]:
    """Versions and hardware, for reproducing a run and for bug reports."""
    import accelerate
    import datasets
    import peft
    import torch
    import transformers

    import tunelab

    info: dict[str, Any] = {
        "python": sys.version.split()[0], "platform": platform.platform(), "torch": torch.__version__,
        "transformers": transformers.__version__, "peft": peft.__version__, "accelerate": accelerate.__version__,
        "datasets": datasets.__version__, "tunelab": tunelab.__version__, "device": device,
        "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "tunelab_commit": git_commit(Path(tunelab.__file__).parent), "project_commit": git_commit(Path.cwd()),
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_count"] = torch.cuda.device_count()
    return info


@dataclass
class RunDir:
    """Paths and writers of one run folder."""

    path: Path

    def __post_init__(self) -> None:
        self.path = Path(self.path)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def config_file(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS_DIR

    @property
    def final(self) -> Path:
        return self.path / FINAL_DIR

    @property
    def tb(self) -> Path:
        return self.path / TB_DIR

    @property
    def metrics(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def run_json(self) -> Path:
        return self.path / RUN_JSON

    @property
    def template_file(self) -> Path:
        return self.path / TEMPLATE_FILE

    @property
    def loss_plot(self) -> Path:
        return self.path / LOSS_PLOT

    @property
    def eval_dir(self) -> Path:
        return self.path / EVAL_DIR

    @property
    def eval_metrics(self) -> Path:
        return self.eval_dir / EVAL_METRICS

    @property
    def export_dir(self) -> Path:
        return self.path / EXPORT_DIR

    def latest_checkpoint(self) -> Path | None:
        return latest_checkpoint(self.checkpoints)

    def create(self) -> None:
        for folder in (self.path, self.checkpoints, self.tb):
            folder.mkdir(parents=True, exist_ok=True)

    def write_start(self, cfg: RunConfig, *, env: dict, data_stats: dict, fingerprint: str, template) -> None:
        from tunelab.config import dump_config

        write_atomic(self.config_file, dump_config(cfg))
        write_json(self.path / ENV_JSON, env)
        write_json(self.path / DATA_JSON, {"fingerprint": fingerprint, **data_stats})
        write_atomic(self.template_file, template.jinja)

    def update(self, **fields: Any) -> dict:
        """Merge `fields` into run.json (status, times, metrics...)."""
        data = {**read_json(self.run_json), **fields}
        write_json(self.run_json, data)
        return data

    def status(self) -> dict:
        return read_json(self.run_json)

    def clean_staging(self) -> None:
        """Drop what a killed run left half-written (never a complete checkpoint)."""
        shutil.rmtree(self.checkpoints / STAGING, ignore_errors=True)
        for leftover in self.path.glob(".final-*"):
            shutil.rmtree(leftover, ignore_errors=True)


def select_run_dir(cfg: RunConfig, resume: bool) -> RunDir:
    """The folder of this run: a new one, or (resume) the named run or the newest run of the same config."""
    root = Path(cfg.train.output_dir).expanduser()
    if cfg.train.run_name:
        run = RunDir(root / cfg.train.run_name)
        if resume and not run.path.is_dir():
            raise TunelabError(f"--resume: no run folder {run.path} to resume")
        if not resume and latest_checkpoint(run.checkpoints) is not None:
            raise TunelabError(
                f"{run.path} already holds checkpoints; continue it with --resume, or choose another "
                "train.run_name (or remove the folder) to start over"
            )
        return run
    if resume:
        return RunDir(_newest_matching_run(cfg, root))
    name = default_run_name(cfg)
    candidate, n = root / name, 1
    while candidate.exists():  # two runs started in the same second
        n += 1
        candidate = root / f"{name}-{n}"
    return RunDir(candidate)


def _newest_matching_run(cfg: RunConfig, root: Path) -> Path:
    from tunelab.config import load_config

    wanted = cfg.model_dump(exclude={"train": {"run_name"}})
    candidates = sorted((p for p in root.glob(f"*/{CONFIG_FILE}")), key=lambda p: p.stat().st_mtime, reverse=True)
    for config_file in candidates:
        try:
            previous = load_config(config_file)
        except (ValueError, OSError):  # ConfigError is a ValueError: a foreign or broken folder is no match
            previous = None
        if previous is not None and previous.model_dump(exclude={"train": {"run_name"}}) == wanted:
            return config_file.parent
    raise TunelabError(
        f"--resume: no run under {root} was started with this config; name the run with train.run_name=NAME "
        "or pass the run folder itself (tunelab train RUN_DIR --resume)"
    )
