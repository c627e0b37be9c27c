"""Experiment trackers through `train.report_to`, offline: wandb and swanlab write their runs into the run folder,
mlflow logs to a sqlite file there. Skipped when the tracker is not installed (pip install 'tunelab[trackers]')."""

from __future__ import annotations

import pytest
from test_train import make_config

from tunelab.training.sft import train


def test_wandb_offline(tiny_llama, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    result = train(make_config(tiny_llama, tmp_path, "train.max_steps=2", "train.report_to=[tensorboard, wandb]"),
                   echo=False)
    runs = list((result.run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))


def test_swanlab_offline(tiny_llama, tmp_path):
    pytest.importorskip("swanlab")
    result = train(make_config(tiny_llama, tmp_path, "train.max_steps=2", "train.report_to=[swanlab]"), echo=False)
    assert any((result.run_dir / "swanlog").rglob("*")), "swanlab wrote nothing into the run folder"


def test_mlflow_sqlite(tiny_llama, tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    result = train(make_config(tiny_llama, tmp_path, "train.max_steps=2", "train.report_to=[mlflow]"), echo=False)
    db = result.run_dir / "mlflow.db"
    assert db.is_file()
    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{db}")
    experiment = client.get_experiment_by_name("tunelab")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "run" and [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2]
