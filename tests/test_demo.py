"""The demo pipeline end to end on a tiny model: every stage runs and leaves its artifacts."""

from __future__ import annotations

from pathlib import Path

import pytest

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


class _Data:
    """What plan_demo reads of prepared data: the stats."""

    def __init__(self, examples: int = 154, mean: float = 60.3):
        self.stats = {"train_examples": examples, "length": {"mean": mean}}
        self.train = [None] * examples


def test_demo_sizes_itself_for_a_slow_fp32_cpu(monkeypatch, capsys):
    """On a CPU without fast bf16 (fp32 matmul ~32 GFLOP/s, the issue's AMD EPYC with AVX2) the 60-step schedule
    would take ~34 min (the issue measured 35-43): the demo switches to the small profile that fits the training budget, and says so."""
    from tunelab import demo
    from tunelab.config import load_config

    cfg = load_config(REPO / "examples" / "demo" / "config.yaml", ["train.mixed_precision=no"])
    monkeypatch.setattr(demo, "measure_matmul_gflops", lambda dtype=None, **_: 32.0)
    plan = demo.plan_demo(cfg, _Data(), budget_s=300)
    assert plan.precision == "fp32" and plan.tokens_per_s == pytest.approx(0.45 * 32)
    assert "train.batch_size=4" in plan.overrides and f"train.max_steps={plan.steps}" in plan.overrides
    assert plan.steps == 17 and plan.estimate_s <= 300  # 300 s x 14.4 tokens/s / (4 x 60.3 tokens per step)
    text = plan.describe()
    assert "fp32 matmul 32 GFLOP/s" in text and "estimated training time" in text and "sized for this hardware" in text
    assert "~34 min" in text  # the full schedule: 60 steps x 482 tokens at 14.4 tokens/s
    cfg_small = load_config(REPO / "examples" / "demo" / "config.yaml", ["train.mixed_precision=no",
                                                                          "train.max_steps=4"])
    assert demo.plan_demo(cfg_small, _Data(), budget_s=300).overrides == []


def test_demo_keeps_the_full_schedule_on_a_fast_cpu(monkeypatch):
    from tunelab import demo
    from tunelab.config import load_config

    cfg = load_config(REPO / "examples" / "demo" / "config.yaml", ["train.mixed_precision=no"])
    monkeypatch.setattr(demo, "measure_matmul_gflops", lambda dtype=None, **_: 600.0)
    plan = demo.plan_demo(cfg, _Data(), budget_s=300)
    assert plan.overrides == [] and plan.steps == 60 and plan.estimate_s < 300
    assert demo.plan_demo(cfg, _Data(), budget_s=1, adapt=False).overrides == []  # --full


def test_matmul_probe_measures_something():
    from tunelab.demo import measure_matmul_gflops

    assert measure_matmul_gflops(size=128, seconds=0.05) > 0.1
