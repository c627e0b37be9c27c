"""Evaluation stage, experiment view: list past runs and compare two or more of them from their run directories.

Reads only the files training writes (config.yaml, run.json, metrics.jsonl; layout in docs/architecture.md) and
what `tunelab eval` adds (<run>/eval/metrics.json); nothing is loaded or imported from the training code, so
half-written or failed runs still list.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tunelab.config.schema import DEFAULT_METHOD
from tunelab.errors import TunelabError
from tunelab.evaluation.results import format_value, ordered_metrics, render_text_table

log = logging.getLogger(__name__)

# Settings shown in the runs list: column -> dotted path into config.yaml.
KEY_SETTINGS = {"model": "model.name", "lr": "train.lr", "batch": "train.batch_size", "max_steps": "train.max_steps",
                "epochs": "train.epochs"}
# Training's final metrics first, then what `tunelab eval` measured on the run (loss-based ones prefixed eval/).
RUN_METRIC_ORDER = ("global_step", "train_loss", "final_loss", "eval_loss", "eval/loss", "eval/perplexity",
                    "eval/tokens")
_EVAL_RENAMES = {"loss": "eval/loss", "perplexity": "eval/perplexity", "eval_tokens": "eval/tokens"}
# Final metrics shown in the runs list (`runs compare` shows all of them).
LIST_METRICS = ("train_loss", "final_loss", "eval_loss", "eval/perplexity", "bleu-4", "rouge-l", "exact_match")
# Method hyperparameters worth a glance: each registered method's summary_keys (none for an unregistered one).
def method_keys(name: str) -> tuple[str, ...]:
    from tunelab.methods import get_method, known_methods

    return get_method(name).summary_keys if name in known_methods() else ()


@dataclass
class RunSummary:
    name: str
    path: Path
    status: str
    started: str | None
    config: dict[str, Any]  # config.yaml as written (not re-validated: old runs must still list)
    metrics: dict[str, float]  # final training metrics, plus the last `tunelab eval` metrics if any
    history: list[dict[str, Any]] = field(default_factory=list)  # metrics.jsonl events

    @property
    def method(self) -> str:
        method = self.config.get("method") or {}
        name = method.get("name", DEFAULT_METHOD)
        params = " ".join(f"{k}={method[k]}" for k in method_keys(name) if k in method)
        return f"{name} {params}".strip()

    def setting(self, dotted: str) -> Any:
        node: Any = self.config
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return None
            node = node[part]
        return node


# ------------------------------------------------------------------------------------------------ reading
def is_run_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.yaml").is_file() and (
        (path / "run.json").is_file() or (path / "metrics.jsonl").is_file() or (path / "final").is_dir())


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        log.warning("%s: unreadable (%s); ignored", path, e)
        return {}
    return data if isinstance(data, dict) else {}


def read_history(run_dir: Path) -> list[dict[str, Any]]:
    """metrics.jsonl events; a torn last line (a run killed mid-write) is skipped, not fatal."""
    path = Path(run_dir) / "metrics.jsonl"
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


def final_metrics(run_json: dict[str, Any], history: list[dict[str, Any]], eval_metrics: dict) -> dict[str, float]:
    found = run_json.get("final_metrics") or run_json.get("metrics") or {}
    metrics = {k: float(v) for k, v in found.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    series = loss_series(history)
    if "train_loss" not in metrics and series["loss"]:
        metrics["train_loss"] = series["loss"][-1][1]  # last logged loss, when training wrote no summary
    if "eval_loss" not in metrics and series["eval_loss"]:
        metrics["eval_loss"] = series["eval_loss"][-1][1]
    for key, value in eval_metrics.items():  # `tunelab eval` results on this run
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            metrics[_EVAL_RENAMES.get(key, key)] = float(value)
    return metrics


def run_metric_names(runs: list[RunSummary]) -> list[str]:
    present = list(dict.fromkeys(k for r in runs for k in r.metrics))
    head = [m for m in RUN_METRIC_ORDER if m in present]
    return head + ordered_metrics(m for m in present if m not in head)


def read_run(run_dir: str | Path) -> RunSummary:
    path = Path(run_dir)
    if not path.is_dir():
        raise TunelabError(f"run directory not found: {path}")
    if not (path / "config.yaml").is_file():
        raise TunelabError(f"{path} is not a run directory: it has no config.yaml (see `tunelab runs` for the list)")
    try:
        config = yaml.safe_load((path / "config.yaml").read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise TunelabError(f"{path / 'config.yaml'}: not valid YAML ({e})") from None
    run_json = _read_json(path / "run.json")
    history = read_history(path)
    eval_metrics = _read_json(path / "eval" / "metrics.json").get("metrics", {})
    status = run_json.get("status") or ("completed" if (path / "final").is_dir() else "incomplete")
    started = next((run_json[k] for k in ("started_at", "started", "start_time") if run_json.get(k)), None)
    return RunSummary(path.name, path, str(status), str(started) if started else None, config,
                      final_metrics(run_json, history, eval_metrics), history)


def list_runs(root: str | Path = "runs") -> list[RunSummary]:
    """Every run directory directly under `root` (or `root` itself when it is one), oldest first."""
    root = Path(root)
    if not root.is_dir():
        raise TunelabError(f"no runs folder at {root} (train something first, or pass the folder: tunelab runs DIR)")
    dirs = [root] if is_run_dir(root) else sorted(p for p in root.iterdir() if is_run_dir(p))
    runs = [read_run(d) for d in dirs]
    return sorted(runs, key=lambda r: (r.started or "", r.path.stat().st_mtime, r.name))


def runs_table(runs: list[RunSummary]) -> str:
    present = {k for r in runs for k in r.metrics}
    metric_names = [m for m in LIST_METRICS if m in present]
    head = ["run", "status", "method", *KEY_SETTINGS, *metric_names]
    rows = []
    for r in runs:
        settings = [_short(r.setting(s)) for s in KEY_SETTINGS.values()]
        values = [format_value(m, r.metrics.get(m)) for m in metric_names]
        rows.append((r.name, r.status, r.method, *settings, *values))
    return render_text_table(head, rows)


def _md(value: Any) -> str:
    return "-" if value is None else str(value).replace("|", "\\|").replace("\n", " ")


def _short(value: Any, width: int = 40) -> str:
    text = "-" if value is None else str(value)
    return text if len(text) <= width else "..." + text[-(width - 3):]


# ---------------------------------------------------------------------------------------------- comparing
def flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(config, dict):
        return {prefix: config}
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        out.update(flatten(value, name) if isinstance(value, dict) and value else {name: value})
    return out


def config_diff(runs: list[RunSummary]) -> dict[str, list[Any]]:
    """Dotted setting -> value per run, for the settings that differ (run_name/output_dir always differ)."""
    flat = [flatten(r.config) for r in runs]
    keys = list(dict.fromkeys(k for f in flat for k in f))
    ignore = {"train.run_name", "train.output_dir"}
    return {k: [f.get(k) for f in flat] for k in keys if k not in ignore and len({repr(f.get(k)) for f in flat}) > 1}


@dataclass
class RunComparison:
    runs: list[RunSummary]
    diff: dict[str, list[Any]]
    plot: Path | None = None

    def metrics_table(self) -> str:
        names = run_metric_names(self.runs)
        rows = [(m, *(format_value(m, r.metrics.get(m)) for r in self.runs)) for m in names]
        return render_text_table(["metric", *(r.name for r in self.runs)], rows)

    def diff_table(self) -> str:
        if not self.diff:
            return "(identical configs)"
        rows = [(k, *(_short(v, 30) for v in values)) for k, values in self.diff.items()]
        return render_text_table(["setting", *(r.name for r in self.runs)], rows)

    def markdown(self) -> str:
        names = [r.name for r in self.runs]
        lines = [f"# Runs: {' vs '.join(names)}", "", "## Config differences", ""]
        if self.diff:
            lines += [f"| setting | {' | '.join(names)} |", "|---|" + "---|" * len(names)]
            lines += [f"| {k} | {' | '.join(_md(v) for v in values)} |" for k, values in self.diff.items()]
        else:
            lines.append("(identical configs)")
        metrics = run_metric_names(self.runs)
        lines += ["", "## Metrics", "", f"| metric | {' | '.join(names)} |", "|---|" + "---:|" * len(names)]
        lines += [f"| {m} | {' | '.join(format_value(m, r.metrics.get(m)) for r in self.runs)} |" for m in metrics]
        if self.plot:
            lines += ["", "## Loss curves", "", f"![loss curves]({self.plot.name})"]
        return "\n".join(lines) + "\n"

    def __str__(self) -> str:
        parts = ["Config differences", self.diff_table(), "", "Metrics", self.metrics_table()]
        if self.plot:
            parts += ["", f"Loss curves: {self.plot}"]
        return "\n".join(parts)


def compare_runs(run_dirs: list[str | Path], output_dir: str | Path | None = None) -> RunComparison:
    """Config diff and metrics side by side; with `output_dir`, also comparison.md and loss.png (every run's
    training and validation loss overlaid in one plot)."""
    if len(run_dirs) < 2:
        raise TunelabError("compare needs at least two runs: tunelab runs compare RUN1 RUN2 ...")
    runs = [read_run(d) for d in run_dirs]
    comparison = RunComparison(runs, config_diff(runs))
    if output_dir is None:
        return comparison
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    curves = {r.name: loss_series(r.history) for r in runs}
    if any(s["loss"] or s["eval_loss"] for s in curves.values()):
        comparison.plot = plot_loss_curves(curves, out / "loss.png")
    (out / "comparison.md").write_text(comparison.markdown(), encoding="utf-8")
    return comparison


def plot_loss_curves(curves: dict[str, dict[str, list[tuple[float, float]]]], out: str | Path) -> Path:
    """One PNG: training loss solid, validation loss dashed with markers, one colour per run."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed; safe in servers and tests
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    for i, (name, series) in enumerate(curves.items()):
        color = f"C{i % 10}"
        if series.get("loss"):
            ax.plot(*zip(*series["loss"]), color=color, label=f"{name} train")
        if series.get("eval_loss"):
            ax.plot(*zip(*series["eval_loss"]), color=color, linestyle="--", marker="o", label=f"{name} validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
