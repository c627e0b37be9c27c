"""Evaluation stage: the result objects evaluate() returns and the report writers and CLI print.

An EvalResult is one model on one dataset; a ComparisonResult lines several of them up on the same examples.
Both print as plain-text tables (the demo prints `compare_models(...)` directly).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tunelab.evaluation.metrics import lower_is_better

# Preference scores (evaluation/preference.py): implicit DPO reward, reward model, reference-free log-likelihood.
PREFERENCE_KINDS = ("reward", "rm", "logp")
PREFERENCE_METRICS = tuple(f"{k}_{s}" for k in PREFERENCE_KINDS for s in ("accuracy", "margin", "chosen", "rejected"))
# Order in tables; scores not listed here (checks, custom metrics) follow in the order they appear.
METRIC_ORDER = ("loss", "perplexity", "eval_tokens", *PREFERENCE_METRICS, "bleu-4", "rouge-1", "rouge-2", "rouge-l",
                "exact_match")
# Not quality metrics: shown in tables but never used to pick a winner or rank examples. A reply's own score
# (chosen or rejected) is not better for being higher: only the margin and the accuracy are.
INFO_METRICS = {"eval_tokens", "num_examples", "examples_per_s", "generation_s",
                *(f"{k}_{s}" for k in PREFERENCE_KINDS for s in ("chosen", "rejected"))}
# Score used to rank examples (best/worst) and to compare models per example, first one present wins. On preference
# data the pair's margin is the question asked; text metrics there only score answers against the chosen reply.
PRIMARY_ORDER = ("reward_margin", "rm_margin", "logp_margin", "rouge-l", "bleu-4", "exact_match")


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
    rejected: str | None = None  # preference data: the rejected reply (the reference is the chosen one)

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
    quality = [k for k in keys if k not in INFO_METRICS and not lower_is_better(k)]
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
    if name == "exact_match" or name.endswith("_accuracy") or ":" in name:  # fractions
        return f"{value:.3f}"
    if "loss" in name or "perplexity" in name or name.startswith(tuple(f"{k}_" for k in PREFERENCE_KINDS)):
        return f"{value:.4f}"
    return f"{value:.2f}"


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
    """Several models on the same examples, against one reference model (`base`, the index of the base model):
    every change is OTHER minus BASE, whatever order the models were given in, and "better" follows each metric's
    direction (lower loss and perplexity are better)."""

    results: list[EvalResult]
    output_dir: Path | None = None
    files: dict[str, Path] = field(default_factory=dict)
    base: int = 0

    @property
    def models(self) -> list[str]:
        return [r.model for r in self.results]

    @property
    def base_model(self) -> str:
        return self.results[self.base].model

    @property
    def others(self) -> list[int]:
        """Indices of the models compared with the base, in the given order."""
        return [i for i in range(len(self.results)) if i != self.base]

    @property
    def tuned(self) -> int:
        """The model whose changes the single "change" column shows: the last one that is not the base."""
        return self.others[-1] if self.others else self.base

    def metric_names(self) -> list[str]:
        return ordered_metrics(name for r in self.results for name in r.metrics)

    def example_counts(self, name: str, other: int | None = None) -> dict[str, int] | None:
        """How many examples `other` (default: `tuned`) scores better / worse / the same as the base on `name`;
        None when the metric has no per-example score (perplexity, eval_tokens)."""
        other = self.tuned if other is None else other
        if name in INFO_METRICS or other == self.base:
            return None
        pairs = [(b.scores.get(name), o.scores.get(name))
                 for b, o in zip(self.results[self.base].predictions, self.results[other].predictions)]
        pairs = [(b, o) for b, o in pairs if b is not None and o is not None]
        if not pairs:
            return None
        sign = -1 if lower_is_better(name) else 1
        better = sum(1 for b, o in pairs if sign * (o - b) > 0)
        worse = sum(1 for b, o in pairs if sign * (o - b) < 0)
        return {"better": better, "worse": worse, "same": len(pairs) - better - worse}

    def rows(self) -> list[dict[str, Any]]:
        """One row per metric: values per model, `changes` (model -> value minus the base's value), `delta` (the
        change of `tuned`), `counts` (per-example better/worse/same of `tuned` vs the base), the best model."""
        out = []
        base = self.base
        for name in self.metric_names():
            values = [r.metrics.get(name) for r in self.results]
            known = [v for v in values if v is not None]
            changes = {self.models[i]: (values[i] - values[base] if None not in (values[i], values[base]) else None)
                       for i in self.others}
            best = None
            if name not in INFO_METRICS and len(known) > 1 and len(set(known)) > 1:
                pick = min if lower_is_better(name) else max
                best = self.models[values.index(pick(known))]
            out.append({"metric": name, "values": values, "base": self.base_model, "changes": changes,
                        "delta": changes.get(self.models[self.tuned]), "counts": self.example_counts(name),
                        "lower_is_better": lower_is_better(name), "best": best})
        return out

    def differences(self, key: str | None = None) -> list[dict[str, Any]]:
        """Per example: each model's prediction and score, and `delta` = score of `tuned` minus score of the base,
        sorted by improvement (largest first; for a lower-is-better key, the largest drop first)."""
        reference = self.results[self.base].predictions
        key = key or primary_score(reference[0].scores if reference else {})
        sign = -1 if lower_is_better(key) else 1
        diffs = []
        for i, base in enumerate(reference):
            preds = [r.predictions[i] for r in self.results]
            scores = [p.scores.get(key) if key else None for p in preds]
            b, t = scores[self.base], scores[self.tuned]
            delta = t - b if None not in (b, t) and self.tuned != self.base else None
            diffs.append({"index": base.index, "source": base.source, "question": base.question,
                          "reference": base.reference, "predictions": [p.prediction for p in preds],
                          "score": key, "scores": scores, "delta": delta})
        return sorted(diffs, key=lambda d: -sign * (d["delta"] or 0.0))

    def headers(self) -> list[str]:
        """Column names: the base is labelled, the change says which way it is taken."""
        names = [f"{m} (base)" if i == self.base else m for i, m in enumerate(self.models)]
        if len(self.results) < 2:
            return ["metric", *names]
        if len(self.others) == 1:
            return ["metric", *names, "change (tuned - base)", "examples better/worse"]
        return ["metric", *names, *(f"change {self.models[i]} - base" for i in self.others),
                f"examples better/worse ({self.models[self.tuned]})"]

    def table(self) -> str:
        rows = []
        for row in self.rows():
            name = row["metric"]
            cells = [format_value(name, v) for v in row["values"]]
            if len(self.results) > 1:
                cells += [format_change(name, row["changes"][self.models[i]]) for i in self.others]
                counts = row["counts"]
                cells.append(f"{counts['better']}/{counts['worse']}" if counts else "-")
            rows.append((name, *cells))
        table = render_text_table(self.headers(), rows)
        if len(self.results) > 1:
            table += (f"\nchange = model minus base ({self.base_model}); lower is better for loss and perplexity, "
                      "higher for the rest; better/worse counts the examples whose own score moved that way")
        return table

    def __str__(self) -> str:
        return self.table()


def format_change(name: str, delta: float | None) -> str:
    """A signed difference with its meaning: `-0.39 better` for a loss, `+0.500 better` for exact match."""
    if delta is None:
        return "-"
    text = ("+" if delta >= 0 else "") + format_value(name, delta)
    if delta and name not in INFO_METRICS:
        better = delta < 0 if lower_is_better(name) else delta > 0
        text += " better" if better else " worse"
    return text


def render_text_table(head: list[str], rows: list[tuple]) -> str:
    """A fixed-width table: first column left-aligned, numbers right-aligned."""
    cells = [list(map(str, head))] + [list(map(str, r)) for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(head))]

    def line(row):
        return "  ".join(c.ljust(widths[0]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(row)).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), sep, *(line(r) for r in cells[1:])])
