"""bench/train.py keeps working: every kind of arm, on a tiny model, one step each (no timing is checked here;
the numbers come from running the bench itself, see docs/speed.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench" / "train.py"


def test_bench_train_runs_every_kind_of_arm(tiny_llama, tmp_path):
    arms = "plain,trl_fast,tunelab,tunelab:train.mixed_precision=no"
    command = [sys.executable, str(BENCH), "--model", str(tiny_llama), "--steps", "2", "--batch-size", "2",
               "--arms", arms, "--gc-arms", "tunelab", "--out", str(tmp_path)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "train.json").read_text(encoding="utf-8"))
    rows = {(r["arm"], r["gc"]): r for r in result["rows"]}
    assert set(rows) == {("plain", False), ("trl_fast", False), ("tunelab", False),
                         ("tunelab:train.mixed_precision=no", False), ("tunelab", True)}
    assert not [r["error"] for r in rows.values() if "error" in r]
    for row in rows.values():
        assert row["tokens_per_s"] > 0 and row["peak_rss_gb"] > 0 and len(row["losses"]) == 2
    # the same examples in the same batches: the first step's loss of the two fp32 arms agrees (up to the
    # different LoRA dropout masks of the two dropout implementations)
    first = [rows[("plain", False)]["losses"][0], rows[("tunelab:train.mixed_precision=no", False)]["losses"][0]]
    assert abs(first[0] - first[1]) / first[0] < 2e-2
    report = (tmp_path / "train.md").read_text(encoding="utf-8")
    assert "x plain" in report and "With gradient checkpointing" in report
    assert result["spec"]["data_examples"] >= 2000


def test_bench_train_fp32_arms_time_the_steps_after_the_first(tiny_llama, tmp_path):
    command = [sys.executable, str(BENCH), "--model", str(tiny_llama), "--steps", "3", "--batch-size", "2",
               "--precision", "fp32", "--arms", "plain,trl_fast,tunelab", "--out", str(tmp_path)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "train_fp32.json").read_text(encoding="utf-8"))
    rows = {r["arm"]: r for r in result["rows"]}
    assert set(rows) == {"plain", "trl_fast", "tunelab"} and not any(r["gc"] for r in rows.values())
    tokens = result["spec"]["tokens"]
    for row in rows.values():
        assert row["precision"] == "fp32", row["arm"]
        assert len(row["train_s_all"]) == 2  # --precision fp32 repeats every arm, interleaved
        assert row["steady"]["steps"] == 2 and row["steady_tokens_per_s"] > 0 and 0 < row["mfu_own"]
        assert row["tokens_seen"][-1] == tokens, row["arm"]  # every arm counts every real token
        first_batch = row["tokens_seen"][0]
        assert row["steady"]["tokens"] == tokens - first_batch
    assert len({r["tokens_seen"][0] for r in rows.values()}) == 1  # the same first batch in every arm
    report = (tmp_path / "train_fp32.md").read_text(encoding="utf-8")
    assert "after step 1" in report and "flags:" in report and "padding_free, fp32" in report
    assert "With gradient checkpointing" not in report
