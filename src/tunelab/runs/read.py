"""Run folders, read back: typed readers of what training and `tunelab eval` wrote, listing and comparing runs.

Only files are read (layout in `tunelab.runs.rundir`); nothing is imported from training, so half-written or
failed runs still read and list. The config is kept as written (a dict): an old run whose config no longer
validates must still list; `read_run_config` validates it for the stages that load the run.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from tunelab.errors import TunelabError
from tunelab.runs.rundir import RunDir, is_run_dir

if TYPE_CHECKING:
    from tunelab.config.schema import RunConfig

log = logging.getLogger(__name__)

# `tunelab eval` metric names as they appear next to training's (the loss-based ones prefixed eval/).
_EVAL_RENAMES = {"loss": "eval/loss", "perplexity": "eval/perplexity", "eval_tokens": "eval/tokens"}
# Older run.json spellings, read as today's field.
_ALIASES = {"started_at": ("started", "start_time"), "metrics": ("final_metrics",)}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _text(value: Any) -> str | None:
    return None if value is None or value == "" else str(value)


def _whole(value: Any) -> int | None:
    return int(value) if _is_number(value) and float(value).is_integer() else None


@dataclass(frozen=True)
class RunInfo:
    """run.json, typed (training writes it through RunDir.update). Missing fields are None; fields this reader
    does not know (a newer tunelab, another stage) stay in `extra`, never dropped."""

    status: str | None = None  # running, completed, stopped, interrupted, failed
    run_name: str | None = None
    model: str | None = None  # model.name as configured
    model_path: str | None = None  # the local folder it resolved to
    method: str | None = None
    template: str | None = None
    data_fingerprint: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    final_dir: str | None = None
    resumed_from: str | None = None
    last_checkpoint: str | None = None
    error: str | None = None
    world_size: int | None = None
    stopped_at_step: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)  # final training metrics (numbers only)
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunInfo:
        known = {f.name for f in fields(cls)} - {"extra"}
        values: dict[str, Any] = {}
        for name in known:
            raw = next((data[k] for k in (name, *_ALIASES.get(name, ())) if data.get(k) is not None), None)
            if name == "metrics":
                raw = raw if isinstance(raw, dict) else {}
                values[name] = {str(k): float(v) for k, v in raw.items() if _is_number(v)}
            elif name in ("world_size", "stopped_at_step"):
                values[name] = _whole(raw)
            else:
                values[name] = _text(raw)
        aliases = {a for names in _ALIASES.values() for a in names}
        extra = {k: v for k, v in data.items() if k not in known and k not in aliases}
        return cls(**values, extra=extra)

    @classmethod
    def read(cls, run_dir: str | Path) -> RunInfo:
        """The run's run.json; an absent or unreadable file gives an empty RunInfo (a run that never started)."""
        return cls.from_dict(_read_json(RunDir(run_dir).run_json))


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        log.warning("%s: unreadable (%s); ignored", path, e)
        return {}
    return data if isinstance(data, dict) else {}


def read_run_config(run_dir: str | Path) -> RunConfig:
    """The run's resolved config.yaml, validated (a config that no longer validates raises ConfigError)."""
    from tunelab.config.load import load_config

    return load_config(RunDir(run_dir).config_file)


def read_config_dict(run_dir: str | Path) -> dict[str, Any]:
    """config.yaml as written, not validated; a clear error when the folder is not a run."""
    run = RunDir(run_dir)
    if not run.path.is_dir():
        raise TunelabError(f"run directory not found: {run.path}")
    if not run.config_file.is_file():
        raise TunelabError(f"{run.path} is not a run directory: it has no config.yaml (see `tunelab runs` for the "
                           "list)")
    try:
        config = yaml.safe_load(run.config_file.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise TunelabError(f"{run.config_file}: not valid YAML ({e})") from None
    if not isinstance(config, dict):
        raise TunelabError(f"{run.config_file}: expected a mapping of config sections, got {type(config).__name__}")
    return config


def read_history(run_dir: str | Path) -> list[dict[str, Any]]:
    """metrics.jsonl events; a torn last line (a run killed mid-write) is skipped, not fatal."""
    path = RunDir(run_dir).metrics
    if not path.is_file():
        return []
    events = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            log.warning("%s:%d: not JSON; skipped", path, n)
            continue
        if isinstance(event, dict):
            events.append(event)
    return events


def read_eval_metrics(run_dir: str | Path) -> dict[str, Any]:
    """The metrics of the last `tunelab eval` on this run (<run>/eval/metrics.json), or {}."""
    found = _read_json(RunDir(run_dir).eval_metrics).get("metrics", {})
    return found if isinstance(found, dict) else {}


def loss_series(history: list[dict[str, Any]]) -> dict[str, list[tuple[float, float]]]:
    """{"loss": [(step, value)], "eval_loss": [...]} from log events (HF Trainer log_history keys)."""
    series: dict[str, list[tuple[float, float]]] = {"loss": [], "eval_loss": []}
    for i, event in enumerate(history):
        step = event.get("step", event.get("global_step", i))
        for key, points in series.items():
            value = event.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value) and isinstance(step, (int, float)):
                points.append((float(step), float(value)))
    return series


def final_metrics(info: RunInfo, history: list[dict[str, Any]], eval_metrics: dict) -> dict[str, float]:
    """Training's final metrics, the last logged losses when training wrote none, then `tunelab eval`'s."""
    metrics = dict(info.metrics)
    series = loss_series(history)
    if "train_loss" not in metrics and series["loss"]:
        metrics["train_loss"] = series["loss"][-1][1]  # last logged loss, when training wrote no summary
    if "eval_loss" not in metrics and series["eval_loss"]:
        metrics["eval_loss"] = series["eval_loss"][-1][1]
    for key, value in eval_metrics.items():  # `tunelab eval` results on this run
        if _is_number(value):
            metrics[_EVAL_RENAMES.get(key, key)] = float(value)
    return metrics


@dataclass
class RunRecord:
    """One run folder, read: what `tunelab runs` lists and compares."""

    name: str
    path: Path
    status: str  # run.json's status; "completed" / "incomplete" for a folder without one
    started: str | None
    config: dict[str, Any]  # config.yaml as written (not re-validated: old runs must still list)
    metrics: dict[str, float]  # final training metrics, plus the last `tunelab eval` metrics if any
    history: list[dict[str, Any]] = field(default_factory=list)  # metrics.jsonl events
    info: RunInfo = field(default_factory=RunInfo)

    def setting(self, dotted: str) -> Any:
        """A config value by dotted path ("train.lr"), None when the run's config does not have it."""
        node: Any = self.config
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return None
            node = node[part]
        return node


def read_run(run_dir: str | Path) -> RunRecord:
    run = RunDir(run_dir)
    config = read_config_dict(run.path)
    info = RunInfo.read(run.path)
    history = read_history(run.path)
    status = info.status or ("completed" if run.final.is_dir() else "incomplete")
    return RunRecord(run.name, run.path, status, info.started_at, config,
                     final_metrics(info, history, read_eval_metrics(run.path)), history, info)


def list_runs(root: str | Path = "runs") -> list[RunRecord]:
    """Every run directory directly under `root` (or `root` itself when it is one), oldest first."""
    root = Path(root)
    if not root.is_dir():
        raise TunelabError(f"no runs folder at {root} (train something first, or pass the folder: tunelab runs DIR)")
    dirs = [root] if is_run_dir(root) else sorted(p for p in root.iterdir() if is_run_dir(p))
    runs = [read_run(d) for d in dirs]
    return sorted(runs, key=lambda r: (r.started or "", r.path.stat().st_mtime, r.name))


# ---------------------------------------------------------------------------------------------- comparing
def flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(config, dict):
        return {prefix: config}
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        out.update(flatten(value, name) if isinstance(value, dict) and value else {name: value})
    return out


def config_diff(runs: list[RunRecord]) -> dict[str, list[Any]]:
    """Dotted setting -> value per run, for the settings that differ (run_name/output_dir always differ)."""
    flat = [flatten(r.config) for r in runs]
    keys = list(dict.fromkeys(k for f in flat for k in f))
    ignore = {"train.run_name", "train.output_dir"}
    return {k: [f.get(k) for f in flat] for k in keys if k not in ignore and len({repr(f.get(k)) for f in flat}) > 1}
