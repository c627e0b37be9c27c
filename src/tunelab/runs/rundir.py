"""Stage 4 (training): the run directory every later stage reads (layout in docs/architecture.md).

    runs/<run_name>/ config.yaml run.json env.json data.json chat_template.jinja metrics.jsonl loss.png
                     tb/ checkpoints/checkpoint-N/ final/

Every file is written atomically (temp file + rename) so a killed run never leaves half a JSON behind.
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
from typing import Any

from tunelab.errors import TunelabError

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
STAGING = ".staging"  # checkpoints are written here, then renamed into place


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


def default_run_name(cfg) -> str:
    model = Path(cfg.model.name.rstrip("/")).name.replace(".gguf", "")
    model = re.sub(r"[^A-Za-z0-9._-]+", "-", model)[:40]
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{model}-{cfg.method.name}"


def latest_checkpoint(checkpoints: Path) -> Path | None:
    """The newest complete checkpoint; incomplete ones never get a checkpoint-N name (see TunelabTrainer)."""
    if not checkpoints.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in checkpoints.iterdir() if p.is_dir() and (m := CHECKPOINT_RE.match(p.name))
             and (p / "trainer_state.json").is_file()]
    return max(found)[1] if found else None


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

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def final(self) -> Path:
        return self.path / "final"

    @property
    def tb(self) -> Path:
        return self.path / "tb"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def run_json(self) -> Path:
        return self.path / "run.json"

    def create(self) -> None:
        for folder in (self.path, self.checkpoints, self.tb):
            folder.mkdir(parents=True, exist_ok=True)

    def write_start(self, cfg, *, env: dict, data_stats: dict, fingerprint: str, template) -> None:
        from tunelab.config import dump_config

        write_atomic(self.path / "config.yaml", dump_config(cfg))
        write_json(self.path / "env.json", env)
        write_json(self.path / "data.json", {"fingerprint": fingerprint, **data_stats})
        write_atomic(self.path / "chat_template.jinja", template.jinja)

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


def select_run_dir(cfg, resume: bool) -> RunDir:
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


def _newest_matching_run(cfg, root: Path) -> Path:
    from tunelab.config import load_config

    wanted = cfg.model_dump(exclude={"train": {"run_name"}})
    candidates = sorted((p for p in root.glob("*/config.yaml")), key=lambda p: p.stat().st_mtime, reverse=True)
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
