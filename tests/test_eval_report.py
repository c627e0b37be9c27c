"""Report files of an evaluation and of a comparison, from results built by hand (no model needed)."""

from __future__ import annotations

import base64
import json
import re

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
    assert header.split() == ["metric", "base", "tuned", "change"]
    em = next(r for r in rows if r.startswith("exact_match")).split()
    assert em == ["exact_match", "0.250", "0.750", "+0.500"]
    diffs = comparison.differences()
    assert diffs[0]["score"] == "rouge-l" and diffs[0]["delta"] == max(d["delta"] for d in diffs)
    assert diffs[-1]["question"].startswith("Say") and diffs[-1]["delta"] < 0  # tuned got worse there
    assert next(r for r in comparison.rows() if r["metric"] == "rouge-l")["best"] == "tuned"

    files = write_comparison(comparison, tmp_path, diffs_shown=2)
    data = json.loads(files["comparison"].read_text(encoding="utf-8"))
    assert data["models"] == ["base", "tuned"] and len(data["differences"]) == 4
    md = files["markdown"].read_text(encoding="utf-8")
    assert "| exact_match | 0.250 | 0.750 | +0.500 |" in md
    assert md.count("**#") == 2  # the largest improvement and the largest regression
    assert 'class="num best"' in files["html"].read_text(encoding="utf-8")
