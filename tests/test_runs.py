"""tunelab.runs and `tunelab runs`: reading, resolving, listing and comparing run directories built here from the
files training writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tunelab.cli.main import main
from tunelab.errors import TunelabError
from tunelab.evaluation.runs import compare_runs, list_runs, read_run, runs_table
from tunelab.runs.read import RunInfo, config_diff, loss_series
from tunelab.runs.rundir import RunDir, is_run_dir


def make_run(root: Path, name: str, *, lr: float = 2e-4, r: int = 8, losses=(2.0, 1.5, 1.2), eval_losses=(1.4,),
             status: str = "finished", started: str = "2026-01-01T00:00:00", eval_metrics: dict | None = None) -> Path:
    run = root / name
    (run / "final").mkdir(parents=True)
    config = {"model": {"name": "tiny"}, "method": {"name": "lora", "r": r, "alpha": 16},
              "train": {"lr": lr, "batch_size": 8, "max_steps": 30, "run_name": name, "output_dir": str(root)},
              "data": {"datasets": [{"path": "train.jsonl"}]}}
    (run / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    (run / "run.json").write_text(json.dumps({"status": status, "started_at": started,  # as training writes it
                                              "metrics": {"train_loss": losses[-1], "eval_loss": None,
                                                          "global_step": 30}}), encoding="utf-8")
    events = [{"step": 10 * (i + 1), "loss": v, "learning_rate": lr} for i, v in enumerate(losses)]
    events += [{"step": 30, "eval_loss": v} for v in eval_losses]
    (run / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events) + '{"step": 4', encoding="utf-8")
    if eval_metrics:
        (run / "eval").mkdir()
        (run / "eval" / "metrics.json").write_text(json.dumps({"metrics": eval_metrics}), encoding="utf-8")
    return run


def test_read_run_takes_metrics_from_run_json_log_and_eval(tmp_path):
    run = make_run(tmp_path, "a", eval_metrics={"rouge-l": 41.5, "loss": 1.1, "perplexity": 3.0})
    summary = read_run(run)
    assert summary.status == "finished" and summary.method == "lora r=8 alpha=16"
    assert summary.metrics == {"train_loss": 1.2, "global_step": 30, "eval_loss": 1.4, "rouge-l": 41.5,
                               "eval/loss": 1.1, "eval/perplexity": 3.0}  # eval_loss None in run.json: from the log
    series = loss_series(summary.history)  # the torn last line of metrics.jsonl is skipped
    assert series == {"loss": [(10.0, 2.0), (20.0, 1.5), (30.0, 1.2)], "eval_loss": [(30.0, 1.4)]}


def test_list_runs_sorted_and_tabled(tmp_path):
    make_run(tmp_path, "late", started="2026-02-01T00:00:00", lr=1e-4)
    make_run(tmp_path, "early", started="2026-01-01T00:00:00", eval_metrics={"exact_match": 0.9})
    (tmp_path / "not-a-run").mkdir()
    runs = list_runs(tmp_path)
    assert [r.name for r in runs] == ["early", "late"]
    table = runs_table(runs)
    header, _, first, second = table.splitlines()
    assert header.split()[:3] == ["run", "status", "method"] and "exact_match" in header
    assert first.startswith("early") and "0.900" in first and "0.0002" in first
    assert second.startswith("late") and "0.0001" in second


def test_missing_run_files_give_clear_errors(tmp_path):
    with pytest.raises(TunelabError, match="no runs folder"):
        list_runs(tmp_path / "nope")
    (tmp_path / "x").mkdir()
    with pytest.raises(TunelabError, match="not a run directory: it has no config.yaml"):
        read_run(tmp_path / "x")
    with pytest.raises(TunelabError, match="at least two runs"):
        compare_runs([make_run(tmp_path, "solo")])


def test_compare_two_runs_diff_metrics_and_overlaid_curves(tmp_path):
    a = make_run(tmp_path, "a", lr=2e-4, r=8, losses=(2.0, 1.5, 1.2))
    b = make_run(tmp_path, "b", lr=5e-4, r=16, losses=(2.1, 1.3, 0.9), eval_losses=(1.2,))
    comparison = compare_runs([a, b], output_dir=tmp_path / "cmp")
    assert comparison.diff == {"method.r": [8, 16], "train.lr": [2e-4, 5e-4]}  # run_name/output_dir ignored
    text = str(comparison)
    assert "method.r" in text and "train_loss" in text and "0.9000" in text and "1.2000" in text
    png = comparison.plot.read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000
    md = (tmp_path / "cmp" / "comparison.md").read_text(encoding="utf-8")
    assert "| method.r | 8 | 16 |" in md and "![loss curves](loss.png)" in md


def test_config_diff_of_identical_runs_is_empty(tmp_path):
    runs = [read_run(make_run(tmp_path, n)) for n in ("a", "b")]
    assert config_diff(runs) == {}


def test_runs_cli_list_and_compare(tmp_path, capsys):
    a, b = make_run(tmp_path, "a"), make_run(tmp_path, "b", lr=1e-3)
    assert main(["runs", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "a " in out and "b " in out and "train_loss" in out
    assert main(["runs", "compare", str(a), str(b), "--output", str(tmp_path / "cmp")]) == 0
    out = capsys.readouterr().out
    assert "train.lr" in out and (tmp_path / "cmp" / "loss.png").is_file()
    assert (tmp_path / "cmp" / "comparison.md").read_text(encoding="utf-8").count("train.lr") == 1
    assert main(["runs", "compare", str(a)]) == 2
    assert "at least two runs" in capsys.readouterr().err
    assert main(["runs", "--json", str(tmp_path)]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in listed] == ["a", "b"] and listed[1]["config"]["train"]["lr"] == 1e-3


def test_run_info_reads_run_json_typed_keeping_unknown_fields(tmp_path):
    run = RunDir(tmp_path / "r")
    run.create()
    assert RunInfo.read(run.path) == RunInfo()  # no run.json yet: an empty record, not an error
    run.update(status="completed", run_name="r", model="tiny", method="lora", world_size=2, stage="dpo",
               metrics={"train_loss": 1.5, "global_step": 3, "eval_loss": None, "flag": True})
    info = RunInfo.read(run.path)
    assert (info.status, info.run_name, info.model, info.method, info.world_size) == ("completed", "r", "tiny",
                                                                                       "lora", 2)
    assert info.metrics == {"train_loss": 1.5, "global_step": 3.0}  # numbers only: None and booleans dropped
    assert info.extra == {"stage": "dpo"} and info.started_at is None
    old = RunInfo.from_dict({"started": "2025-01-01", "final_metrics": {"train_loss": 2}, "world_size": "x"})
    assert old.started_at == "2025-01-01" and old.metrics == {"train_loss": 2.0} and old.world_size is None
    run.run_json.write_text("{torn", encoding="utf-8")
    assert RunInfo.read(run.path).status is None


def test_one_run_folder_rule_for_listing_and_resolving(tmp_path):
    """A run that logged metrics but wrote no run.json/final/ lists, and chat/export refuse it with the next step
    (before, inference/artifacts.py and evaluation/runs.py each had their own rule, and this folder was a run for
    one and an unknown model name for the other)."""
    from tunelab.runs.artifacts import resolve_artifact

    run = RunDir(tmp_path / "half")
    run.create()
    run.config_file.write_text(yaml.safe_dump({"model": {"name": "tiny"}, "train": {"run_name": "half"}}))
    assert not is_run_dir(run.path)  # a config alone is not a run (it never started)
    run.metrics.write_text('{"step": 1, "loss": 2.0}\n', encoding="utf-8")
    assert is_run_dir(run.path)
    assert [r.name for r in list_runs(tmp_path)] == ["half"] and read_run(run.path).status == "incomplete"
    with pytest.raises(TunelabError, match="has no final/ folder.*no checkpoint in .*checkpoints"):
        resolve_artifact(str(run.path))


def test_run_dir_names_every_file_of_the_layout(tmp_path):
    run = RunDir(tmp_path / "x")
    assert {p.relative_to(run.path).as_posix() for p in (run.config_file, run.run_json, run.metrics, run.tb,
                                                          run.checkpoints, run.final, run.template_file,
                                                          run.loss_plot, run.eval_metrics)} == {
        "config.yaml", "run.json", "metrics.jsonl", "tb", "checkpoints", "final", "chat_template.jinja", "loss.png",
        "eval/metrics.json"}


def test_runs_package_imports_no_higher_stage():
    """tunelab.runs sits below training, inference, evaluation, export, serving and the web UI."""
    import subprocess
    import sys

    code = ("import sys, tunelab.runs.rundir, tunelab.runs.read, tunelab.runs.artifacts\n"
            "bad = sorted(m for m in sys.modules if m.startswith('tunelab.') and m.split('.')[1] in "
            "('training', 'inference', 'evaluation', 'export', 'serving', 'webui', 'cli', 'data', 'methods'))\n"
            "print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_model_provenance_names_the_gguf_quantization(tmp_path):
    """The default model is a dequantized Q4_1 GGUF: run.json and `tunelab env` must say so."""
    from tunelab.cli.env import environment
    from tunelab.models.resolve import gguf_quantization, model_provenance

    assert gguf_quantization(Path("SmolLM2-135M-Instruct.Q4_1.gguf")) == "Q4_1"
    assert gguf_quantization(Path("model-q8_0.gguf")) == "Q8_0"
    assert gguf_quantization(Path("x.Q4_K_M.gguf")) == "Q4_K_M"
    converted = tmp_path / "converted"
    converted.mkdir()
    assert model_provenance(converted) is None  # an ordinary folder: nothing to say
    (converted / "tunelab_source.json").write_text(json.dumps({"gguf": "/pkgs/SmolLM2-135M-Instruct.Q4_1.gguf"}))
    source = model_provenance(converted)
    assert source["quantization"] == "Q4_1" and source["dequantized_to"] == "float32"
    assert "not the full-precision" in source["note"]
    note = environment()["default_model"]
    assert "Q4_1" in note or "not installed" in note
