"""Evaluation stage, experiment view: the runs list and the comparison of two or more runs, as tables, Markdown
and one overlaid loss plot.

The run folders are read by tunelab.runs.read (typed readers; nothing is imported from training, so half-written
or failed runs still list); this module only decides what is shown.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from tunelab.config.schema import DEFAULT_METHOD
from tunelab.errors import TunelabError
from tunelab.evaluation.results import format_value, ordered_metrics, render_text_table
from tunelab.runs import read
from tunelab.runs.read import RunRecord, config_diff, loss_series

# Settings shown in the runs list: column -> dotted path into config.yaml.
KEY_SETTINGS = {"model": "model.name", "lr": "train.lr", "batch": "train.batch_size", "max_steps": "train.max_steps",
                "epochs": "train.epochs"}
# Training's final metrics first, then what `tunelab eval` measured on the run (loss-based ones prefixed eval/).
RUN_METRIC_ORDER = ("global_step", "train_loss", "final_loss", "eval_loss", "eval/loss", "eval/perplexity",
                    "eval/tokens")
# Final metrics shown in the runs list (`runs compare` shows all of them).
LIST_METRICS = ("train_loss", "final_loss", "eval_loss", "eval/perplexity", "bleu-4", "rouge-l", "exact_match")
# Method hyperparameters worth a glance: each registered method's summary_keys (none for an unregistered one).
def method_keys(name: str) -> tuple[str, ...]:
    from tunelab.methods import get_method, known_methods

    return get_method(name).summary_keys if name in known_methods() else ()


@dataclass
class RunSummary(RunRecord):
    """A run as the runs list shows it: the record tunelab.runs.read gives, plus a one-line method label."""

    @classmethod
    def of(cls, record: RunRecord) -> RunSummary:
        return cls(**{f.name: getattr(record, f.name) for f in fields(RunRecord)})

    @property
    def method(self) -> str:
        method = self.config.get("method") or {}
        name = method.get("name", DEFAULT_METHOD)
        params = " ".join(f"{k}={method[k]}" for k in method_keys(name) if k in method)
        return f"{name} {params}".strip()


# ------------------------------------------------------------------------------------------------ listing
def run_metric_names(runs: list[RunSummary]) -> list[str]:
    present = list(dict.fromkeys(k for r in runs for k in r.metrics))
    head = [m for m in RUN_METRIC_ORDER if m in present]
    return head + ordered_metrics(m for m in present if m not in head)


def read_run(run_dir: str | Path) -> RunSummary:
    return RunSummary.of(read.read_run(run_dir))


def list_runs(root: str | Path = "runs") -> list[RunSummary]:
    """Every run directory directly under `root` (or `root` itself when it is one), oldest first."""
    return [RunSummary.of(r) for r in read.list_runs(root)]


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
