"""Report files of an evaluation and of a comparison, from results built by hand (no model needed)."""

from __future__ import annotations

import base64
import json
import re

import pytest
from test_runs import make_run

from tunelab.evaluation.metrics import aggregate, score_predictions
from tunelab.evaluation.report import write_comparison, write_reports
from tunelab.evaluation.results import ComparisonResult, EvalResult, PredictionRecord

PAIRS = [  # (question, reference, prediction of model A, prediction of model B)
    ("Reverse: a b c", "c b a", "a b c", "c b a"),
    ("法国的首都是哪里？", "法国的首都是巴黎。", "巴黎。", "法国的首都是巴黎。"),
    ("Say <b>hi</b> | twice", "hi | hi", "hi | hi", "hello"),
    ("2+2?", "4", "5", "4"),
]


def make_result(name: str, column: int, run_dir=None) -> EvalResult:
    preds = [p[column] for p in PAIRS]
    refs = [p[1] for p in PAIRS]
    scores = score_predictions(preds, refs, ["bleu", "rouge", "exact_match"])
    records = [PredictionRecord(i, f"eval.jsonl:{i + 1}", [{"role": "user", "content": q}], f"<user>{q}</user>", ref,
                                pred, s) for i, ((q, ref, *_), pred, s) in enumerate(zip(PAIRS, preds, scores))]
    metrics = {"loss": 1.25, "perplexity": 3.4903, "eval_tokens": 40, **aggregate(scores)}
    return EvalResult(name, metrics, records, {"data": "eval.jsonl", "num_examples": len(PAIRS)}, run_dir=run_dir)


def test_write_reports_files_and_content(tmp_path):
    run = make_run(tmp_path, "run1")  # has metrics.jsonl but no loss.png: the curve is drawn from the log
    result = make_result("run1", 2, run_dir=run)
    files = write_reports(result, tmp_path / "out")
    assert set(files) == {"predictions", "metrics", "loss_curve", "markdown", "html"}

    lines = (tmp_path / "out" / "predictions.jsonl").read_text(encoding="utf-8").splitlines()
    first = json.loads(lines[1])
    assert len(lines) == 4 and first["reference"] == "法国的首都是巴黎。" and first["prediction"] == "巴黎。"
    assert set(first) >= {"prompt", "messages", "reference", "prediction", "scores", "source"}
    assert set(first["scores"]) == {"bleu-4", "rouge-1", "rouge-2", "rouge-l", "exact_match"}

    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["model"] == "run1" and metrics["metrics"]["exact_match"] == 0.25

    md = (tmp_path / "out" / "report.md").read_text(encoding="utf-8")
    assert "| exact_match | 0.250 |" in md and "| perplexity | 3.4903 |" in md and "![loss curve](loss.png)" in md
    best, worst = md.split("## Best examples")[1].split("## Worst examples")
    assert "hi | hi" in best and "2+2?" in worst  # exact match ranks first, the wrong number last

    page = (tmp_path / "out" / "report.html").read_text(encoding="utf-8")
    assert "Say &lt;b&gt;hi&lt;/b&gt;" in page and "<b>hi</b> |" not in page  # user text is escaped
    assert 'src="http' not in page and "<link" not in page  # self-contained
    png = re.search(r'src="data:image/png;base64,([^"]+)"', page).group(1)
    assert base64.b64decode(png).startswith(b"\x89PNG")


def test_report_without_run_has_no_curve(tmp_path):
    files = write_reports(make_result("base", 2), tmp_path)
    assert "loss_curve" not in files and "data:image/png" not in files["html"].read_text(encoding="utf-8")


def test_comparison_table_and_differences(tmp_path):
    comparison = ComparisonResult([make_result("base", 2), make_result("tuned", 3)])
    table = str(comparison)
    header, _, *rows = table.splitlines()
    assert header.split("  ")[0:1] == ["metric"] and "base (base)" in header and "change (tuned - base)" in header
    em = next(r for r in rows if r.startswith("exact_match")).split()
    assert em == ["exact_match", "0.250", "0.750", "+0.500", "better", "3/1"]
    diffs = comparison.differences()
    assert diffs[0]["score"] == "rouge-l" and diffs[0]["delta"] == max(d["delta"] for d in diffs)
    assert diffs[-1]["question"].startswith("Say") and diffs[-1]["delta"] < 0  # tuned got worse there
    assert next(r for r in comparison.rows() if r["metric"] == "rouge-l")["best"] == "tuned"

    files = write_comparison(comparison, tmp_path, diffs_shown=2)
    data = json.loads(files["comparison"].read_text(encoding="utf-8"))
    assert data["models"] == ["base", "tuned"] and len(data["differences"]) == 4
    md = files["markdown"].read_text(encoding="utf-8")
    assert "| exact_match | 0.250 | 0.750 | +0.500 better | 3/1 |" in md
    assert md.count("**#") == 2  # the largest improvement and the largest regression
    assert 'class="num best"' in files["html"].read_text(encoding="utf-8")


def test_comparison_change_is_tuned_minus_base_whatever_the_order(tmp_path):
    """`tunelab eval RUN --compare BASE` lists the tuned model first: the change must still be tuned minus base,
    with the base labelled, and a lower loss reported as better."""
    base, tuned = make_result("base", 2), make_result("tuned", 3)
    tuned.metrics.update(loss=1.48, perplexity=4.3929)
    base.metrics.update(loss=1.87, perplexity=6.4883)
    for rec, loss in zip(base.predictions, (2.0, 1.5, 1.0, 3.0)):
        rec.scores["loss"] = loss
    for rec, loss in zip(tuned.predictions, (1.0, 1.0, 2.0, 1.0)):
        rec.scores["loss"] = loss
    for order, base_index in (([tuned, base], 1), ([base, tuned], 0)):
        comparison = ComparisonResult(order, base=base_index)
        rows = {r["metric"]: r for r in comparison.rows()}
        assert rows["loss"]["delta"] == pytest.approx(1.48 - 1.87)
        assert rows["exact_match"]["delta"] == pytest.approx(0.5)
        assert rows["loss"]["counts"] == {"better": 3, "worse": 1, "same": 0}  # per-example losses, lower is better
        assert rows["exact_match"]["counts"] == {"better": 3, "worse": 1, "same": 0}
        assert rows["perplexity"]["counts"] is None  # no per-example perplexity
        table = str(comparison)
        assert "base (base)" in table and "change (tuned - base)" in table
        loss_line = next(line for line in table.splitlines() if line.startswith("loss"))
        assert "-0.3900 better" in loss_line and loss_line.rstrip().endswith("3/1")
        diffs = comparison.differences()
        assert diffs[0]["delta"] == max(d["delta"] for d in diffs)  # tuned minus base on rouge-l, best first
        assert diffs[-1]["question"].startswith("Say") and diffs[-1]["delta"] < 0
        md = write_comparison(comparison, tmp_path / str(base_index))["markdown"].read_text(encoding="utf-8")
        assert "(base: base)" in md and "-0.3900 better" in md and "tuned minus base" in md


def test_reference_index_finds_the_base_of_a_run_in_any_position(tmp_path):
    from tunelab.evaluation.evaluate import reference_index

    run = make_run(tmp_path, "run1")
    (run / "run.json").write_text(json.dumps({"status": "completed", "model": "org/base-model"}), encoding="utf-8")
    assert reference_index([str(run), "org/base-model"]) == 1
    assert reference_index(["org/base-model", str(run)]) == 0
    assert reference_index([str(run), "org/other"]) == 1  # the only model that is not a run
    assert reference_index(["org/a", "org/b"]) == 0  # nothing to tell: the first
