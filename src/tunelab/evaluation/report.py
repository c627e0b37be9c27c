"""Evaluation stage, output: predictions JSONL, metrics JSON, a Markdown report and a self-contained HTML page.

The HTML page needs nothing next to it: styles are inline and the loss curve is embedded as a base64 PNG, so it
can be mailed or attached to an issue as one file.
"""

from __future__ import annotations

import base64
import html
import json
import math
import shutil
from pathlib import Path
from typing import Any

from tunelab.evaluation.results import (
    PREFERENCE_KINDS,
    ComparisonResult,
    EvalResult,
    PredictionRecord,
    format_value,
    ordered_metrics,
)
from tunelab.evaluation.runs import plot_loss_curves
from tunelab.runs.read import loss_series, read_history
from tunelab.runs.rundir import RunDir

EXAMPLES_SHOWN = 3  # best and worst examples in a report
_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;padding:4px 10px;vertical-align:top}
th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}td.best{font-weight:bold}
pre{white-space:pre-wrap;word-break:break-word;background:#f7f7f7;padding:6px;margin:2px 0}
.ex{border:1px solid #ddd;border-radius:6px;padding:8px 12px;margin:10px 0}.meta{color:#666;font-size:90%}
img{max-width:100%}"""


def _json_default(value: Any):
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def _clean(value: Any) -> Any:
    """NaN/inf are not JSON: write null instead so every tool can read the file."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def write_json(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(_clean(data), ensure_ascii=False, indent=2, default=_json_default) + "\n",
                    encoding="utf-8")
    return path


def write_predictions(path: Path, predictions: list[PredictionRecord]) -> Path:
    with path.open("w", encoding="utf-8") as f:
        for p in predictions:
            f.write(json.dumps(_clean(p.to_json()), ensure_ascii=False) + "\n")
    return path


def loss_curve_png(result: EvalResult, out_dir: Path) -> Path | None:
    """The run's loss.png copied next to the report, or drawn from metrics.jsonl when training wrote no PNG."""
    if result.run_dir is None:
        return None
    run_dir = Path(result.run_dir)
    target = out_dir / "loss.png"
    plot = RunDir(run_dir).loss_plot
    if plot.is_file():
        if plot.resolve() != target.resolve():
            shutil.copyfile(plot, target)
        return target
    series = loss_series(read_history(run_dir))
    if series["loss"] or series["eval_loss"]:
        return plot_loss_curves({run_dir.name: series}, target)
    return None


def write_reports(result: EvalResult, out_dir: str | Path) -> dict[str, Path]:
    """Write predictions.jsonl, metrics.json, report.md and report.html into `out_dir`; return kind -> path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "predictions": write_predictions(out / "predictions.jsonl", result.predictions),
        "metrics": write_json(out / "metrics.json", {"model": result.model, "metrics": result.metrics,
                                                     "info": result.info}),
    }
    curve = loss_curve_png(result, out)
    if curve is not None:
        files["loss_curve"] = curve
    files["markdown"] = out / "report.md"
    files["markdown"].write_text(markdown_report(result, curve), encoding="utf-8")
    files["html"] = out / "report.html"
    files["html"].write_text(html_report(result, curve), encoding="utf-8")
    result.output_dir, result.files = out, files
    return files


# ----------------------------------------------------------------------------------------------- markdown
def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _fence(text: str) -> str:
    return f"````text\n{text}\n````"


def _scores_line(scores: dict[str, float]) -> str:
    return ", ".join(f"{k} {format_value(k, v)}" for k, v in scores.items())


def _md_examples(title: str, examples: list[PredictionRecord]) -> list[str]:
    lines = [f"## {title}", ""]
    for p in examples:
        lines += [f"**#{p.index}** `{p.source}` - {_scores_line(p.scores)}", "", "Prompt:", _fence(p.question),
                  "Reference:", _fence(p.reference), "Prediction:", _fence(p.prediction), ""]
    return lines


def _info_lines(info: dict[str, Any]) -> list[str]:
    return [f"- {k}: {v}" for k, v in info.items() if not isinstance(v, (dict, list))]


def markdown_report(result: EvalResult, curve: Path | None = None) -> str:
    lines = [f"# Evaluation of {result.model}", "", *_info_lines(result.info), "", "## Metrics", "",
             "| metric | value |", "|---|---:|"]
    lines += [f"| {m} | {format_value(m, result.metrics[m])} |" for m in ordered_metrics(result.metrics)]
    lines.append("")
    if curve is not None:
        lines += ["## Training loss", "", f"![loss curve]({curve.name})", ""]
    pairs = shown_pairs(result)
    if pairs:
        lines += _md_pairs(pairs, result.info)
    ranked = result.ranked()
    if ranked and ranked[0].scores:
        k = min(EXAMPLES_SHOWN, (len(ranked) + 1) // 2)
        lines += _md_examples("Best examples", ranked[:k])
        lines += _md_examples("Worst examples", ranked[::-1][:k])
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ preference pairs
def pair_kinds(scores: dict[str, float]) -> list[str]:
    return [k for k in PREFERENCE_KINDS if f"{k}_margin" in scores]


def shown_pairs(result: EvalResult, n: int = EXAMPLES_SHOWN) -> list[PredictionRecord]:
    """The pairs the model prefers most clearly and the ones it gets most wrong (by the first score kind's
    margin), at most `n` of each; empty when the data holds no pairs."""
    pairs = [p for p in result.predictions if p.rejected is not None and pair_kinds(p.scores)]
    if not pairs:
        return []
    key = f"{pair_kinds(pairs[0].scores)[0]}_margin"
    pairs = sorted(pairs, key=lambda p: -p.scores.get(key, 0.0))
    if len(pairs) <= 2 * n:
        return pairs
    return pairs[:n] + pairs[-n:]


def _pair_rows(p: PredictionRecord) -> list[tuple[str, str, str, str]]:
    return [(kind, format_value(f"{kind}_chosen", p.scores[f"{kind}_chosen"]),
             format_value(f"{kind}_rejected", p.scores[f"{kind}_rejected"]),
             format_value(f"{kind}_margin", p.scores[f"{kind}_margin"])) for kind in pair_kinds(p.scores)]


PAIR_NOTE = ("reward: implicit DPO reward beta * (log p - log p_ref) summed over the reply; rm: the reward model's "
             "score; logp: mean log-likelihood per reply token (reference-free). margin = chosen - rejected.")


def _md_pairs(pairs: list[PredictionRecord], info: dict[str, Any]) -> list[str]:
    lines = ["## Preference pairs", "", PAIR_NOTE]
    if info.get("reference"):
        lines.append(f"Reference model: {info['reference']}.")
    lines.append("")
    for p in pairs:
        lines += [f"**#{p.index}** `{p.source}`", "", "Prompt:", _fence(p.question), "Chosen:", _fence(p.reference),
                  "Rejected:", _fence(p.rejected or ""), "", "| score | chosen | rejected | margin |",
                  "|---|---:|---:|---:|", *(f"| {' | '.join(row)} |" for row in _pair_rows(p)), ""]
    return lines


def _html_pairs(pairs: list[PredictionRecord], info: dict[str, Any]) -> list[str]:
    body = ["<h2>Preference pairs</h2>", f"<p>{_esc(PAIR_NOTE)}</p>"]
    if info.get("reference"):
        body.append(f"<p>Reference model: {_esc(info['reference'])}.</p>")
    for p in pairs:
        rows = "".join("<tr>" + "".join(f'<td class="num">{_esc(c)}</td>' if i else f"<td>{_esc(c)}</td>"
                                        for i, c in enumerate(row)) + "</tr>" for row in _pair_rows(p))
        body.append(f'<div class="ex"><div class="meta">#{p.index} · {_esc(p.source)}</div><b>Prompt</b>'
                    f"<pre>{_esc(p.question)}</pre><b>Chosen</b><pre>{_esc(p.reference)}</pre><b>Rejected</b>"
                    f"<pre>{_esc(p.rejected)}</pre><table><tr><th>score</th><th>chosen</th><th>rejected</th>"
                    f"<th>margin</th></tr>{rows}</table></div>")
    return body


# --------------------------------------------------------------------------------------------------- html
def _esc(text: Any) -> str:
    return html.escape(str(text))


def _png_img(path: Path | None, alt: str) -> str:
    if path is None or not Path(path).is_file():
        return ""
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img alt="{_esc(alt)}" src="data:image/png;base64,{data}">'


def _html_page(title: str, body: list[str]) -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{_esc(title)}</title><style>{_CSS}</style></head><body>\n"
            + "\n".join(body) + "\n</body></html>\n")


def _html_example(p: PredictionRecord) -> str:
    return (f'<div class="ex"><div class="meta">#{p.index} · {_esc(p.source)} · {_esc(_scores_line(p.scores))}'
            f"</div><b>Prompt</b><pre>{_esc(p.question)}</pre><b>Reference</b><pre>{_esc(p.reference)}</pre>"
            f"<b>Prediction</b><pre>{_esc(p.prediction)}</pre></div>")


def html_report(result: EvalResult, curve: Path | None = None) -> str:
    body = [f"<h1>Evaluation of {_esc(result.model)}</h1>", "<ul>"]
    body += [f"<li>{_esc(k)}: {_esc(v)}</li>" for k, v in result.info.items() if not isinstance(v, (dict, list))]
    body += ["</ul>", "<h2>Metrics</h2>", "<table><tr><th>metric</th><th>value</th></tr>"]
    body += [f'<tr><td>{_esc(m)}</td><td class="num">{format_value(m, result.metrics[m])}</td></tr>'
             for m in ordered_metrics(result.metrics)]
    body.append("</table>")
    if curve is not None:
        body += ["<h2>Training loss</h2>", _png_img(curve, "loss curve")]
    pairs = shown_pairs(result)
    if pairs:
        body += _html_pairs(pairs, result.info)
    ranked = result.ranked()
    if ranked and ranked[0].scores:
        k = min(EXAMPLES_SHOWN, (len(ranked) + 1) // 2)
        body += ["<h2>Best examples</h2>", *map(_html_example, ranked[:k])]
        body += ["<h2>Worst examples</h2>", *map(_html_example, ranked[::-1][:k])]
    return _html_page(f"Evaluation of {result.model}", body)


# ----------------------------------------------------------------------------------------------- comparison
def write_comparison(comparison: ComparisonResult, out_dir: str | Path, diffs_shown: int = 10) -> dict[str, Path]:
    """comparison.json (metrics side by side and every per-example difference), comparison.md and .html."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    diffs = comparison.differences()
    files = {"comparison": write_json(out / "comparison.json", {
        "models": comparison.models, "metrics": comparison.rows(), "differences": diffs})}
    shown = notable_differences(diffs, diffs_shown)
    files["markdown"] = out / "comparison.md"
    files["markdown"].write_text(comparison_markdown(comparison, shown), encoding="utf-8")
    files["html"] = out / "comparison.html"
    files["html"].write_text(comparison_html(comparison, shown), encoding="utf-8")
    comparison.output_dir, comparison.files = out, files
    return files


def notable_differences(diffs: list[dict], n: int) -> list[dict]:
    """The largest improvements and the largest regressions (diffs come sorted by change, best first)."""
    if len(diffs) <= n:
        return diffs
    return diffs[: (n + 1) // 2] + diffs[len(diffs) - n // 2:]


def _delta_text(metric: str, delta: float | None) -> str:
    from tunelab.evaluation.results import format_change

    return format_change(metric, delta)


def _change_cells(comparison: ComparisonResult, row: dict) -> list[str]:
    cells = [_delta_text(row["metric"], row["changes"][comparison.models[i]]) for i in comparison.others]
    counts = row["counts"]
    return cells + [f"{counts['better']}/{counts['worse']}" if counts else "-"]


def comparison_markdown(comparison: ComparisonResult, diffs: list[dict]) -> str:
    models = comparison.models
    head = comparison.headers()
    lines = [f"# Comparison: {' vs '.join(models)} (base: {comparison.base_model})", "",
             "| " + " | ".join(map(_md_cell, head)) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for row in comparison.rows():
        cells = [format_value(row["metric"], v) for v in row["values"]]
        if len(models) > 1:
            cells += _change_cells(comparison, row)
        lines.append(f"| {row['metric']} | {' | '.join(cells)} |")
    lines += ["", f"Change = model minus base ({comparison.base_model}); lower is better for loss and perplexity.",
              "", (f"## Per-example differences ({diffs[0]['score'] if diffs else 'none'}, "
              f"{models[comparison.tuned]} minus base)"), ""]
    for d in diffs:
        lines += [f"**#{d['index']}** `{d['source']}` change {_delta_text(d['score'] or '', d['delta'])}", "",
                  "Prompt:", _fence(d["question"]), "Reference:", _fence(d["reference"])]
        for model, pred, score in zip(models, d["predictions"], d["scores"]):
            lines += [f"{model} ({format_value(d['score'] or '', score)}):", _fence(pred)]
        lines.append("")
    return "\n".join(lines) + "\n"


def comparison_html(comparison: ComparisonResult, diffs: list[dict]) -> str:
    models = comparison.models
    body = [f"<h1>Comparison: {_esc(' vs '.join(models))}</h1>", "<table><tr>"
            + "".join(f"<th>{_esc(h)}</th>" for h in comparison.headers()) + "</tr>"]
    for row in comparison.rows():
        cells = "".join(f'<td class="num{" best" if row["best"] == m else ""}">{format_value(row["metric"], v)}</td>'
                        for m, v in zip(models, row["values"]))
        changes = "".join(f'<td class="num">{_esc(c)}</td>' for c in _change_cells(comparison, row)) \
            if len(models) > 1 else ""
        body.append(f"<tr><td>{_esc(row['metric'])}</td>{cells}{changes}</tr>")
    body += ["</table>", (f"<p>Change = model minus base ({_esc(comparison.base_model)}); lower is better for loss "
             "and perplexity.</p>"), "<h2>Per-example differences</h2>"]
    for d in diffs:
        preds = "".join(f"<b>{_esc(m)}</b> ({format_value(d['score'] or '', s)})<pre>{_esc(p)}</pre>"
                        for m, p, s in zip(models, d["predictions"], d["scores"]))
        body.append(f'<div class="ex"><div class="meta">#{d["index"]} · {_esc(d["source"])} · change '
                    f"{_esc(_delta_text(d['score'] or '', d['delta']))}</div><b>Prompt</b><pre>{_esc(d['question'])}"
                    f"</pre><b>Reference</b><pre>{_esc(d['reference'])}</pre>{preds}</div>")
    return _html_page("Comparison", body)
