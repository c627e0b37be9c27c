"""Evaluation stage: the result objects evaluate() returns and the report writers and CLI print.

An EvalResult is one model on one dataset; a ComparisonResult lines several of them up on the same examples.
Both print as plain-text tables (the demo prints `compare_models(...)` directly).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# Order in tables; scores not listed here (checks, custom metrics) follow in the order they appear.
METRIC_ORDER = ("loss", "perplexity", "eval_tokens", "bleu-4", "rouge-1", "rouge-2", "rouge-l", "exact_match")
LOWER_IS_BETTER = {"loss", "perplexity"}
# Not quality metrics: shown in tables but never used to pick a winner or rank examples.
INFO_METRICS = {"eval_tokens", "num_examples", "examples_per_s", "generation_s"}
# Score used to rank examples (best/worst) and to compare models per example, first one present wins.
PRIMARY_ORDER = ("rouge-l", "bleu-4", "exact_match")


@dataclass
class PredictionRecord:
    """One evaluated example: what the model saw, what it said, what it should have said, and its scores."""

    index: int
    source: str  # "file:line" of the record, for finding it again
    messages: list[dict[str, Any]]  # the conversation up to (not including) the reference answer
    prompt: str  # the rendered prompt text, exactly as fed to the model
    reference: str
    prediction: str
    scores: dict[str, float] = field(default_factory=dict)
    finish_reason: str | None = None
    completion_tokens: int | None = None

    @property
    def question(self) -> str:
        """The last user message: what a reader wants to see in a report."""
        users = [m.get("content", "") for m in self.messages if m.get("role") == "user"]
        return users[-1] if users else self.prompt

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def primary_score(keys) -> str | None:
    keys = list(keys)
    for name in PRIMARY_ORDER:
        if name in keys:
            return name
    quality = [k for k in keys if k not in INFO_METRICS and k not in LOWER_IS_BETTER]
    return quality[0] if quality else None


def ordered_metrics(names) -> list[str]:
    names = list(dict.fromkeys(names))
    head = [n for n in METRIC_ORDER if n in names]
    return head + [n for n in names if n not in head]


def format_value(name: str, value: float | None) -> str:
    if value is None:
        return "-"
    if name in ("eval_tokens", "eval/tokens", "num_examples", "global_step", "tokens_seen"):
        return str(int(value))
    if name == "exact_match" or ":" in name:  # fractions
        return f"{value:.3f}"
    return f"{value:.4f}" if "loss" in name or "perplexity" in name else f"{value:.2f}"


@dataclass
class EvalResult:
    """One model evaluated on one dataset."""

    model: str
    metrics: dict[str, float]
    predictions: list[PredictionRecord]
    info: dict[str, Any] = field(default_factory=dict)  # data, template, generation settings, timings
    run_dir: Path | None = None
    output_dir: Path | None = None
    files: dict[str, Path] = field(default_factory=dict)  # kind -> written file

    def primary(self) -> str | None:
        return primary_score(self.metrics)

    def ranked(self) -> list[PredictionRecord]:
        """Predictions from best to worst on the primary score (ties keep dataset order)."""
        key = primary_score(self.predictions[0].scores) if self.predictions else None
        if key is None:
            return list(self.predictions)
        return sorted(self.predictions, key=lambda p: -p.scores.get(key, 0.0))

    def table(self) -> str:
        rows = [(name, format_value(name, self.metrics[name])) for name in ordered_metrics(self.metrics)]
        return render_text_table(["metric", self.model], rows)

    def __str__(self) -> str:
        return self.table()


@dataclass
class ComparisonResult:
    """Several models on the same examples: metrics side by side and per-example differences."""

    results: list[EvalResult]
    output_dir: Path | None = None
    files: dict[str, Path] = field(default_factory=dict)

    @property
    def models(self) -> list[str]:
        return [r.model for r in self.results]

    def metric_names(self) -> list[str]:
        return ordered_metrics(name for r in self.results for name in r.metrics)

    def rows(self) -> list[dict[str, Any]]:
        """One row per metric: values per model, the change from the first model to the last, the best model."""
        out = []
        for name in self.metric_names():
            values = [r.metrics.get(name) for r in self.results]
            known = [v for v in values if v is not None]
            delta = values[-1] - values[0] if len(values) > 1 and None not in (values[0], values[-1]) else None
            best = None
            if name not in INFO_METRICS and len(known) > 1 and len(set(known)) > 1:
                pick = min if name in LOWER_IS_BETTER else max
                best = self.models[values.index(pick(known))]
            out.append({"metric": name, "values": values, "delta": delta, "best": best})
        return out

    def differences(self, key: str | None = None) -> list[dict[str, Any]]:
        """Per example: each model's prediction and score, and the score change from the first model to the last,
        sorted by that change (largest improvement first)."""
        first = self.results[0].predictions
        key = key or primary_score(first[0].scores if first else {})
        diffs = []
        for i, base in enumerate(first):
            preds = [r.predictions[i] for r in self.results]
            scores = [p.scores.get(key) if key else None for p in preds]
            delta = scores[-1] - scores[0] if None not in scores and len(scores) > 1 else None
            diffs.append({"index": base.index, "source": base.source, "question": base.question,
                          "reference": base.reference, "predictions": [p.prediction for p in preds],
                          "score": key, "scores": scores, "delta": delta})
        return sorted(diffs, key=lambda d: -(d["delta"] or 0.0))

    def table(self) -> str:
        head = ["metric", *self.models] + (["change"] if len(self.results) > 1 else [])
        rows = []
        for row in self.rows():
            cells = [format_value(row["metric"], v) for v in row["values"]]
            if len(self.results) > 1:
                d = row["delta"]
                cells.append("-" if d is None else ("+" if d >= 0 else "") + format_value(row["metric"], d))
            rows.append((row["metric"], *cells))
        return render_text_table(head, rows)

    def __str__(self) -> str:
        return self.table()


def render_text_table(head: list[str], rows: list[tuple]) -> str:
    """A fixed-width table: first column left-aligned, numbers right-aligned."""
    cells = [list(map(str, head))] + [list(map(str, r)) for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(head))]

    def line(row):
        return "  ".join(c.ljust(widths[0]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(row)).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), sep, *(line(r) for r in cells[1:])])
