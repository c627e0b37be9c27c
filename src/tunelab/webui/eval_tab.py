"""Web UI, Evaluate tab: `tunelab eval` on a run or model (metrics table and examples), and runs compared side by
side (config differences, metrics, loss curves) through tunelab.evaluation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gradio as gr

from tunelab.webui.i18n import text
from tunelab.webui.render import esc, guard, message, open_image, table_html, whole_number

EXAMPLES_SHOWN = 10
RUNS_POLL_S = 3.0  # how often the run pickers look for new or finished runs


def run_choices(runs_dir: Path) -> list[str]:
    """Run folders under runs_dir, newest last (empty when there is no runs folder yet)."""
    from tunelab.evaluation.runs import list_runs

    if not runs_dir.is_dir():
        return []
    return [str(r.path) for r in list_runs(runs_dir)]


def eval_config(model: str, metrics: list[str], max_samples, max_new_tokens):
    """The run's own eval section (as the CLI uses it) with the page's choices on top."""
    from tunelab.config.schema import EvalConfig
    from tunelab.runs.read import read_run_config
    from tunelab.runs.rundir import is_run_dir

    path = Path(model)
    cfg = read_run_config(path).eval if is_run_dir(path) else EvalConfig()
    update: dict[str, Any] = {"output_dir": None}
    if metrics:
        update["metrics"] = list(metrics)
    update["max_samples"] = whole_number(max_samples, "max_samples")
    update["max_new_tokens"] = whole_number(max_new_tokens, "max_new_tokens")
    return EvalConfig.model_validate({**cfg.model_dump(), **update})


def metrics_frame(result, lang: str = "en"):
    """The metrics table with headers in the page language."""
    import pandas as pd

    from tunelab.evaluation.results import format_value, ordered_metrics

    rows = [[name, format_value(name, result.metrics[name])] for name in ordered_metrics(result.metrics)]
    return pd.DataFrame(rows, columns=[text("eval.col.metric", lang), text("eval.col.value", lang)])


def examples_html(predictions, n: int = EXAMPLES_SHOWN, lang: str = "en") -> str:
    """Question, reference and prediction of the first n examples, with their scores."""
    q, ref, pred = (esc(text(f"eval.{k}", lang)) for k in ("q", "ref", "pred"))
    blocks = []
    for p in predictions[:n]:
        scores = ", ".join(f"{k} {v:.3f}" for k, v in p.scores.items())
        blocks.append(
            f'<div class="tl-example"><div class="tl-src">#{p.index} <code>{esc(p.source)}</code> · {esc(scores)}'
            f'</div><div><b>{q}</b> {esc(p.question)}</div><div><b>{ref}</b> {esc(p.reference)}</div>'
            f'<div><b>{pred}</b> {esc(p.prediction)}</div></div>'
        )
    return "".join(blocks)


def comparison_html(comparison, lang: str = "en") -> str:
    """ComparisonResult of compare_models: metrics side by side and the examples that changed most."""
    from tunelab.evaluation.results import format_value

    q, ref = (esc(text(f"eval.{k}", lang)) for k in ("q", "ref"))
    rows = [[r["metric"], *(format_value(r["metric"], v) for v in r["values"]), r["best"] or "-"]
            for r in comparison.rows()]
    out = [table_html([text("eval.col.metric", lang), *comparison.models, text("eval.col.best", lang)], rows)]
    for d in comparison.differences()[:EXAMPLES_SHOWN]:
        preds = "".join(f"<div><b>{esc(m)}</b> {esc(p)}</div>" for m, p in zip(comparison.models, d["predictions"]))
        out.append(f'<div class="tl-example"><div><b>{q}</b> {esc(d["question"])}</div>'
                   f'<div><b>{ref}</b> {esc(d["reference"])}</div>{preds}</div>')
    return "".join(out)


def runs_comparison(run_dirs: list[str], runs_dir: Path, lang: str = "en") -> tuple[str, str | None]:
    """compare_runs: config differences + metrics as HTML, and the overlaid loss curves PNG."""
    from tunelab.evaluation.results import format_value, ordered_metrics
    from tunelab.evaluation.runs import compare_runs

    out = runs_dir / "_compare" / "_vs_".join(Path(d).name for d in run_dirs)
    comparison = compare_runs(run_dirs, output_dir=out)
    names = [r.name for r in comparison.runs]
    diff = [[k, *("-" if v is None else str(v)[:60] for v in values)] for k, values in comparison.diff.items()]
    metrics = [[m, *(format_value(m, r.metrics.get(m)) for r in comparison.runs)]
               for m in ordered_metrics(k for r in comparison.runs for k in r.metrics)]
    body = (table_html([text("eval.col.setting", lang), *names], diff)
            + table_html([text("eval.col.metric", lang), *names], metrics))
    return body, open_image(comparison.plot)


def evaluate_event(lang, model, data, metrics, samples, new_tokens):
    """`tunelab eval MODEL [--data FILE]`: status line, metrics rows, examples (best first)."""
    from tunelab.errors import TunelabError
    from tunelab.evaluation.evaluate import evaluate

    if not model:
        raise TunelabError(f"{text('eval.model', lang)}: required")
    result = evaluate(model, (data or "").strip() or None, eval_config(model, metrics, samples, new_tokens))
    where = result.files.get("html")
    done = text("eval.done", lang, model=result.model, n=len(result.predictions)) + (f" · {where}" if where else "")
    return message(esc(done), "ok"), metrics_frame(result, lang), examples_html(result.ranked(), lang=lang)


def compare_runs_event(lang, folder, selected):
    return runs_comparison(list(selected or []), Path(folder), lang)


def compare_models_event(lang, selected, data, metrics, samples, new_tokens):
    """`tunelab eval A --compare B ...`: every chosen run or model on the same examples."""
    from tunelab.evaluation.evaluate import compare_models

    chosen = list(selected or [])
    cfg = eval_config(chosen[0] if chosen else "", metrics, samples, new_tokens)
    return comparison_html(compare_models(chosen, (data or "").strip() or None, cfg), lang), None


def build(ui) -> dict[str, Any]:
    from tunelab.evaluation.metrics import known_metrics

    L = ui.L
    with gr.Row(equal_height=True):
        runs_dir = L.make(gr.Textbox, "eval.runs_dir", value=str(ui.runs_dir), scale=3, elem_id="eval-runs-dir")
        refresh = L.make(gr.Button, "eval.refresh", prop="value", elem_id="eval-refresh")
    model = L.make(gr.Dropdown, "eval.model", info="eval.model.info", choices=[], allow_custom_value=True,
                   elem_id="eval-model")
    with gr.Row():
        data = L.make(gr.Textbox, "eval.data", scale=3, elem_id="eval-data")
        max_samples = L.make(gr.Number, "eval.max_samples", value=20, precision=0, elem_id="eval-max-samples")
        max_new = L.make(gr.Number, "eval.max_new_tokens", value=64, precision=0, elem_id="eval-max-new")
    metrics = L.make(gr.CheckboxGroup, "eval.metrics", choices=known_metrics(),
                     value=["loss", "perplexity", "bleu", "rouge", "exact_match"], elem_id="eval-metrics")
    run_btn = L.make(gr.Button, "eval.run", prop="value", variant="primary", elem_id="eval-run")
    status = gr.HTML(elem_id="eval-status")
    table = L.make(gr.Dataframe, "eval.table", headers=[L.t("eval.col.metric"), L.t("eval.col.value")],
                   interactive=False, elem_id="eval-table")
    examples = gr.HTML(elem_id="eval-examples")
    compare_sel = L.make(gr.Dropdown, "eval.compare_runs", choices=[], multiselect=True, allow_custom_value=True,
                         elem_id="eval-compare-runs")
    with gr.Row():
        compare_btn = L.make(gr.Button, "eval.compare", prop="value", elem_id="eval-compare")
        compare_models_btn = L.make(gr.Button, "eval.compare_models", prop="value", elem_id="eval-compare-models")
    compare_out = gr.HTML(elem_id="eval-compare-out")
    compare_plot = L.make(gr.Image, "train.loss", type="pil", elem_id="eval-compare-plot", height=320,
                          interactive=False)

    def threaded(fn):
        """Generation in this process runs with the page's threads setting (see app.apply_threads)."""
        def run(lang, *args):
            ui.apply_threads()
            return fn(lang, *args)
        return run

    run_btn.click(guard(threaded(evaluate_event), 3, 0), [ui.lang, model, data, metrics, max_samples, max_new],
                  [status, table, examples])
    compare_btn.click(guard(compare_runs_event, 2, 0), [ui.lang, runs_dir, compare_sel], [compare_out, compare_plot])
    compare_models_btn.click(guard(threaded(compare_models_event), 2, 0),
                             [ui.lang, compare_sel, data, metrics, max_samples, max_new], [compare_out, compare_plot])
    return {"refresh": refresh, "runs_dir": runs_dir, "model": model, "compare": compare_sel, "status": status}


def runs_changed(folder: str, known: list[str] | None) -> list[str] | None:
    """The run list of `folder` when it differs from `known` (what the page shows), else None."""
    choices = run_choices(Path(folder)) if folder else []
    return None if choices == (known or []) else choices


def connect_run_lists(ui, demo, evaluate: dict[str, Any], pickers: list) -> None:
    """Fill every run picker (here and in other tabs) with the runs found: on page load, on Refresh, and whenever a
    run appears or finishes (a timer checks the runs folder every RUNS_POLL_S and updates the pickers only when
    the list changed, so a choice being made is not disturbed)."""
    known = gr.State([])

    def refresh(lang, folder):
        choices = run_choices(Path(folder))
        return ("", choices, *[gr.update(choices=choices) for _ in pickers])

    def poll(lang, folder, shown):
        choices = runs_changed(folder, shown)
        if choices is None:
            return (gr.skip(),) * (2 + len(pickers))
        return (gr.skip(), choices, *[gr.update(choices=choices) for _ in pickers])

    inputs, outputs = [ui.lang, evaluate["runs_dir"]], [evaluate["status"], known, *pickers]
    handler = guard(refresh, len(outputs), 0)
    evaluate["refresh"].click(handler, inputs, outputs)
    demo.load(handler, inputs, outputs)
    timer = gr.Timer(RUNS_POLL_S)
    timer.tick(guard(poll, len(outputs), 0), [*inputs, known], outputs, show_progress="hidden")
