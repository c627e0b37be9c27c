"""Interrupted runs and multi-process runs, with real processes: kill -9 mid-run (and mid-save), resume to the same
final loss as an uninterrupted run; 2 CPU processes (torchrun, gloo) follow the 1-process loss curve."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_train import losses, make_config

from tunelab.config import dump_config, load_config
from tunelab.runs.rundir import latest_checkpoint
from tunelab.training.sft import train

KILLER = """
import os, signal, sys, threading
from transformers import TrainerCallback
from tunelab.config import load_config
from tunelab.training.sft import train

STEP, DELAY = int(sys.argv[2]), float(sys.argv[3])

def kill():
    os.kill(os.getpid(), signal.SIGKILL)

class Kill(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == STEP:  # the save of this step starts right after this callback
            threading.Timer(DELAY, kill).start() if DELAY else kill()

train(load_config(sys.argv[1]), callbacks=[Kill()], echo=False)
"""


def run_and_kill(cfg, tmp_path: Path, step: int, delay: float = 0.0) -> int:
    config_file = tmp_path / f"{cfg.train.run_name}.yaml"
    config_file.write_text(dump_config(cfg), encoding="utf-8")
    script = tmp_path / "killer.py"
    script.write_text(KILLER, encoding="utf-8")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(script), str(config_file), str(step), str(delay)], env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    return proc.returncode


COMMON = ["train.max_steps=6", "train.save_steps=2", "train.save_total_limit=1", "method.dropout=0.1"]


@pytest.fixture(scope="module")
def uninterrupted(tiny_models, tmp_path_factory) -> list[float]:
    tmp = tmp_path_factory.mktemp("whole")
    return losses(train(make_config(tiny_models["llama"], tmp, *COMMON), echo=False).run_dir)


@pytest.mark.parametrize("delay", [0.0, 0.02], ids=["between-steps", "during-save"])
def test_resume_after_kill_ends_with_the_uninterrupted_loss(delay, uninterrupted, tiny_llama, tmp_path):
    cfg = make_config(tiny_llama, tmp_path, *COMMON)
    # kill after step 3 (checkpoint-2 is complete), or 20 ms into the save of checkpoint-4
    assert run_and_kill(cfg, tmp_path, step=4 if delay else 3, delay=delay) == -9  # really killed
    run = tmp_path / "runs" / "run"
    last = latest_checkpoint(run / "checkpoints")
    assert last is not None and last.name in ("checkpoint-2", "checkpoint-4")
    assert (last / "optimizer.pt").is_file() and (last / "scheduler.pt").is_file()
    assert json.loads((run / "run.json").read_text())["status"] == "running"  # what a kill leaves
    result = train(cfg, resume=True, echo=False)
    status = json.loads((run / "run.json").read_text())
    assert status["status"] == "completed" and status["resumed_from"] == str(last)
    resumed = losses(run)  # steps logged before the checkpoint, then the resumed ones; none twice
    assert resumed[-1] == pytest.approx(uninterrupted[-1], rel=1e-5)  # same final loss
    assert resumed == pytest.approx(uninterrupted, rel=1e-5)  # and the same curve
    assert result.metrics["global_step"] == 6
    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]  # the killed steps purged
    assert not (run / "checkpoints" / ".staging").exists()


def test_resume_finds_the_run_of_the_same_config(tiny_llama, tmp_path):
    cfg = make_config(tiny_llama, tmp_path, "train.max_steps=4", "train.save_steps=2")
    unnamed = cfg.model_copy(update={"train": cfg.train.model_copy(update={"run_name": None})})
    first = train(unnamed, echo=False)
    again = train(unnamed.model_copy(update={"train": unnamed.train.model_copy(update={"max_steps": 6})}),
                  echo=False)
    assert again.run_dir != first.run_dir  # different config: a new run
    resumed = train(unnamed, resume=True, echo=False)
    assert resumed.run_dir == first.run_dir
    status = json.loads((first.run_dir / "run.json").read_text())
    assert status["resumed_from"].endswith("checkpoint-4")


def test_cli_resume_from_the_run_folder(tiny_llama, tmp_path, capsys):
    from tunelab.cli.main import main

    cfg = make_config(tiny_llama, tmp_path, "train.max_steps=4", "train.save_steps=2")
    train(cfg, echo=False)
    run = tmp_path / "runs" / "run"
    assert main(["train", str(run), "train.max_steps=6", "--resume"]) == 0
    assert "resuming from" in capsys.readouterr().out
    assert losses(run)[-1] and json.loads((run / "run.json").read_text())["metrics"]["global_step"] == 6


def train_in_two_processes(cfg, tmp_path: Path) -> tuple[Path, str]:
    """`tunelab train CONFIG --nproc 2` (torchrun, gloo) in a subprocess: its run folder and printed output."""
    config_file = tmp_path / f"{cfg.train.run_name}.yaml"
    config_file.write_text(dump_config(cfg), encoding="utf-8")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "tunelab.cli.main", "train", str(config_file), "--nproc", "2"],
                          env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = Path(cfg.train.output_dir) / cfg.train.run_name
    assert json.loads((run / "env.json").read_text())["world_size"] == 2
    return run, proc.stdout


def test_two_cpu_processes_follow_the_one_process_loss_curve(tiny_llama, tmp_path):
    common = ["train.max_steps=4", "train.save_steps=2", "train.group_by_length=false", "train.mixed_precision=no"]
    single = train(make_config(tiny_llama, tmp_path, "train.run_name=one", "train.batch_size=4", *common), echo=False)
    run, stdout = train_in_two_processes(make_config(tiny_llama, tmp_path, "train.run_name=two", "train.batch_size=2",
                                                     *common), tmp_path)
    assert losses(run) == pytest.approx(losses(single.run_dir), rel=1e-4)
    assert sorted(p.name for p in (run / "checkpoints" / "checkpoint-4").glob("rng_state_*.pth")) == [
        "rng_state_0.pth", "rng_state_1.pth"]
    assert (run / "final" / "adapter_config.json").is_file()
    assert stdout.count("tunelab chat") == 1  # printed once, by rank 0


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_signal_stops_after_the_step_with_a_checkpoint_and_resume_finishes(tiny_llama, tmp_path, sig):
    """Ctrl-C (or the web UI's Stop, or a scheduler's SIGTERM) mid-run: the step finishes, a checkpoint is saved,
    run.json says "stopped", the exit code is 130, and --resume carries on from that step."""
    import signal
    import time

    cfg = make_config(tiny_llama, tmp_path, "train.max_steps=100000", "train.save_steps=100000",
                      "train.mixed_precision=no")
    config_file = tmp_path / "run.yaml"
    config_file.write_text(dump_config(cfg), encoding="utf-8")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "tunelab.cli.main", "train", str(config_file)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run = tmp_path / "runs" / "run"
    deadline = time.time() + 300
    while not (run / "metrics.jsonl").is_file() or len(losses(run)) < 2:
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-3000:]
        time.sleep(0.2)
    proc.send_signal(getattr(signal, sig))
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 130, out[-3000:]
    status = json.loads((run / "run.json").read_text())
    step = status["stopped_at_step"]
    assert status["status"] == "stopped" and step >= 2 and "--resume" in out
    assert latest_checkpoint(run / "checkpoints").name == f"checkpoint-{step}"
    assert not (run / "final").exists()

    resumed = train(load_config(config_file, [f"train.max_steps={step + 2}"]), resume=True, echo=False)
    assert resumed.status == "completed" and resumed.metrics["global_step"] == step + 2
    assert json.loads((run / "run.json").read_text())["status"] == "completed"


def test_sigterm_while_the_model_loads_exits_130_as_documented(tiny_llama, tmp_path):
    """SIGTERM before the training loop starts (data prepared, model loading) exits 130 like Ctrl-C, not 143."""
    import signal

    cfg = make_config(tiny_llama, tmp_path, "train.max_steps=100000", "train.mixed_precision=no")
    config_file = tmp_path / "run.yaml"
    config_file.write_text(dump_config(cfg), encoding="utf-8")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "tunelab.cli.main", "train", str(config_file)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    for line in proc.stdout:  # the memory estimate is printed after data preparation, before the model loads
        seen.append(line)
        if line.startswith("memory estimate"):
            proc.send_signal(signal.SIGTERM)
            break
    out = "".join(seen) + proc.communicate(timeout=300)[0]
    assert proc.returncode == 130, out[-3000:]
    assert "interrupted" in out
