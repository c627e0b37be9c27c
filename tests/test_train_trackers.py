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


def test_a_resumed_tensorboard_file_sorts_after_the_interrupted_one(tmp_path):
    """TensorBoard reads event files in name order; a resume in the same second as the killed run (whose pid may
    sort higher) must still come last, or its purge runs before the old steps and the curve reads 3,4,5,6,1,2."""
    import time

    from tunelab.training.trackers import tensorboard_callback

    old = tmp_path / f"events.out.tfevents.{int(time.time())}.host.99999999.0"
    old.write_bytes(b"")
    callback = tensorboard_callback(tmp_path, purge_step=3)
    callback.tb_writer.flush()
    names = sorted(p.name for p in tmp_path.glob("events.out.tfevents.*"))
    callback.tb_writer.close()
    assert len(names) == 2 and names[-1] != old.name
