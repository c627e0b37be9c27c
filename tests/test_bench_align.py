"""bench/align.py keeps working: the TRL side and the harness on a tiny model, two steps (timings are not checked;
the numbers come from running the bench itself). The tunelab side needs the dpo stage (tunelab.training.stages)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench" / "align.py"


def _run(tiny_llama, tmp_path, arms: str) -> dict:
    command = [sys.executable, str(BENCH), "--model", str(tiny_llama), "--steps", "2", "--batch-size", "2",
               "--cutoff", "384", "--arms", arms, "--out", str(tmp_path)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((tmp_path / "align.json").read_text(encoding="utf-8"))


def test_bench_align_trl_side_and_report(tiny_llama, tmp_path):
    result = _run(tiny_llama, tmp_path, "trl_nogc")
    row = result["rows"][0]
    assert "error" not in row, row.get("error")
    assert row["tokens_per_s"] > 0 and row["peak_rss_gb"] > 0 and len(row["losses"]) == 2
    assert abs(row["losses"][0] - 0.6931) < 1e-3  # step 1: policy == reference, the DPO loss is ln 2
    assert row["beta"] == 0.1 and row["loss_type"] == ["sigmoid"]  # TRL's defaults, as the report says
    assert result["spec"]["pairs"] == 4 and result["spec"]["tokens"] > 0
    assert "TRL DPOTrainer" in (tmp_path / "align.md").read_text(encoding="utf-8")


def test_bench_align_tunelab_against_trl(tiny_llama, tmp_path):
    if importlib.util.find_spec("tunelab.training.stages") is None:
        pytest.skip("needs the dpo stage (tunelab.training.stages, issue 14 ATRAIN)")
    result = _run(tiny_llama, tmp_path, "trl_nogc,tunelab,tunelab:method.dropout=0")
    rows = {r["arm"]: r for r in result["rows"]}
    assert not [r["error"] for r in rows.values() if "error" in r]
    assert len(rows["tunelab"]["losses"]) == 2
    assert abs(rows["tunelab"]["losses"][0] - rows["trl_nogc"]["losses"][0]) < 1e-3  # both start at ln 2
    assert "tunelab vs TRL DPOTrainer" in (tmp_path / "align.md").read_text(encoding="utf-8")
    assert "tunelab dpo stage, method.dropout=0" in (tmp_path / "align.md").read_text(encoding="utf-8")
