"""The demo pipeline end to end on a tiny model: every stage runs and leaves its artifacts (sizing: test_demo_plan.py)."""

from __future__ import annotations

from pathlib import Path

from tunelab.demo import run_demo

REPO = Path(__file__).parents[1]


def test_demo_pipeline_on_tiny_model(tiny_llama, tmp_path, capsys):
    result = run_demo(REPO / "examples" / "demo" / "config.yaml", [
        f"model.name={tiny_llama}", f"train.output_dir={tmp_path}", "train.run_name=demo", "train.max_steps=2",
        "train.report_to=[]", "eval.max_samples=2", "eval.max_new_tokens=4", "export.gguf=[]", "export.ollama=false",
    ])
    out = capsys.readouterr().out
    assert "1/6 data" in out and "6/6 export" in out and "summary" in out
    assert out.index("estimated training time") < out.index("3/6 train")  # the estimate comes before training
    assert (result.run_dir / "final").is_dir() and (result.run_dir / "eval-compare" / "comparison.json").is_file()
    assert (result.export_dir / "config.json").is_file()
    assert len(result.base_answers) == len(result.tuned_answers) == 3
    assert set(result.timings) >= {"data", "train", "evaluate", "export", "total"}
