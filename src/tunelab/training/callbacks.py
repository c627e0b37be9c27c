"""Stage 4 (training): what the user sees while training runs (console line + progress bar, metrics.jsonl,
TensorBoard) and the loss curve drawn at the end. All are transformers TrainerCallbacks."""

from __future__ import annotations

import json
import math
import signal
import sys
import threading
import time
from pathlib import Path

from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback

from tunelab.runs.rundir import checkpoint_name

# Trainer log keys -> short names in the console line and metrics.jsonl
RENAMES = {"learning_rate": "lr", "grad_norm": "grad_norm", "loss": "loss", "eval_loss": "eval_loss"}


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


def format_log_line(record: dict, max_steps: int) -> str:
    """One console line per logging step: epoch, step/total, loss, lr, tokens/s, elapsed, ETA."""
    parts = [f"epoch {record.get('epoch', 0):.2f}", f"step {record['step']}/{max_steps}"]
    if "loss" in record:
        parts.append(f"loss {record['loss']:.4f}")
    if "eval_loss" in record:
        parts.append(f"eval_loss {record['eval_loss']:.4f}")
    for key, short in (("rewards/accuracies", "reward_acc"), ("rewards/margins", "margin"),
                       ("eval_rewards/accuracies", "eval_reward_acc")):  # alignment stages (TRL's names)
        if key in record:
            parts.append(f"{short} {record[key]:.3f}")
    if "lr" in record:
        parts.append(f"lr {record['lr']:.2e}")
    if record.get("tokens_per_s"):
        parts.append(f"{record['tokens_per_s']:.0f} tok/s")
    if "elapsed_s" in record:
        parts.append(f"elapsed {format_duration(record['elapsed_s'])}")
    if record.get("eta_s") is not None:
        parts.append(f"ETA {format_duration(record['eta_s'])}")
    return " | ".join(parts)


class MonitorCallback(ProgressCallback):
    """Progress bar (from transformers) plus a readable line and a metrics.jsonl record per log event."""

    def __init__(self, metrics_path: Path, echo: bool = True):
        super().__init__()
        self.metrics_path = metrics_path
        self.echo = echo
        self.records: list[dict] = []

    def on_train_begin(self, args, state, control, **kwargs):
        if self.echo:
            super().on_train_begin(args, state, control, **kwargs)
        self.current_step = state.global_step
        self._start = self._last_time = time.perf_counter()
        self._start_step = state.global_step
        self._last_tokens = state.num_input_tokens_seen

    def on_step_end(self, args, state, control, **kwargs):
        if self.training_bar is not None:
            super().on_step_end(args, state, control, **kwargs)

    def on_train_end(self, args, state, control, **kwargs):
        if self.training_bar is not None:
            super().on_train_end(args, state, control, **kwargs)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or not hasattr(self, "_start"):
            return
        record = self.make_record(state, logs)
        self.records.append(record)
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
        if self.echo and ("loss" in record or "eval_loss" in record):
            line = format_log_line(record, state.max_steps)
            if self.training_bar is not None:
                self.training_bar.write(line)
            else:
                print(line, flush=True)

    def make_record(self, state, logs: dict) -> dict:
        now = time.perf_counter()
        record: dict = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4), "time": time.time()}
        record.update({RENAMES.get(k, k): v for k, v in logs.items() if k not in ("epoch", "num_input_tokens_seen")})
        tokens = state.num_input_tokens_seen
        if tokens and "loss" in logs:
            record["tokens_per_s"] = round((tokens - self._last_tokens) / max(now - self._last_time, 1e-9), 2)
            record["tokens_seen"] = tokens
            self._last_tokens, self._last_time = tokens, now
        record["elapsed_s"] = round(now - self._start, 3)
        done = state.global_step - self._start_step
        if done > 0 and state.max_steps:
            record["eta_s"] = round((state.max_steps - state.global_step) * (now - self._start) / done, 1)
        return record


class NonFiniteLossError(RuntimeError):
    """Raised by the trainer before the optimizer step that would have applied a NaN/inf loss."""

    def __init__(self, step: int, value: float):
        self.step, self.value = step, value
        super().__init__(f"loss became {value} at step {step}")


def is_finite(value: float) -> bool:
    return not (math.isnan(value) or math.isinf(value))


class RunStatusCallback(TrainerCallback):
    """Keeps run.json current: total steps once known, the last complete checkpoint after every save."""

    def __init__(self, run_dir):
        self.run_dir = run_dir

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.run_dir.update(max_steps=state.max_steps)

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.run_dir.update(last_checkpoint=checkpoint_name(state.global_step), step=state.global_step)


class GracefulStop(TrainerCallback):
    """Ctrl-C or SIGTERM (the web UI's Stop, a scheduler's preemption) while training: finish the current step,
    save a checkpoint, stop; `tunelab train CFG --resume` continues from it. A second Ctrl-C aborts at once.

    Every rank must stop at the same step (a checkpoint is a collective operation), so with several processes the
    request is shared by an all-reduce at each step end.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested = False
        self.stopped_at: int | None = None
        self._previous: dict = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():  # signal handlers need the main thread
            return
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum, _frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        print("\nstopping after this step and saving a checkpoint (Ctrl-C again to abort without saving)",
              file=sys.stderr, flush=True)

    def on_step_end(self, args, state, control, **kwargs):
        if _any_rank(self.requested, args.world_size):
            control.should_save = True
            control.should_training_stop = True
            self.stopped_at = state.global_step


class StopBeforeTraining:
    """SIGTERM while the model loads or the data is prepared (before GracefulStop takes over) or while final/ is
    saved: raise KeyboardInterrupt, as Ctrl-C does, so the command exits with 130 as documented instead of
    Python's default SIGTERM death (143) with run.json left saying "running"."""

    def __enter__(self):
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
        return False

    @staticmethod
    def _handle(signum, _frame):
        raise KeyboardInterrupt(f"stopped by signal {signal.Signals(signum).name}")


def _any_rank(flag: bool, world_size: int) -> bool:
    if world_size <= 1:
        return flag
    import torch
    import torch.distributed as dist
    from accelerate import PartialState

    value = torch.tensor([int(flag)], device=PartialState().device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a kill
            continue
    return records


def truncate_metrics(path: Path, last_step: int) -> None:
    """On resume: keep what was logged up to the checkpoint; the steps after it are trained (and logged) again."""
    from tunelab.runs.rundir import write_atomic

    kept = [r for r in read_metrics(path) if r.get("step", 0) <= last_step]
    if path.is_file():
        write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept))


def plot_losses(metrics_path: Path, png: Path, title: str = "") -> Path | None:
    """loss.png: training loss (and validation loss) against step, from metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers; must precede pyplot
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r and is_finite(r["loss"])]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    if not train and not evals:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), marker="o", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    return png
