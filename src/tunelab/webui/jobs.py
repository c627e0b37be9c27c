"""Web UI: run `tunelab train CFG` in its own process and watch it through the run directory.

The UI never trains in its own process: it starts exactly the command a person would type (same Python, same
CLI), so a run started from the browser is the same run as one started from a terminal, and a crash or OOM in
training cannot take the UI down. Progress comes from what training writes (metrics.jsonl, run.json).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError

LOG_TAIL_CHARS = 20_000  # how much of the log the page shows
STEP_RE = re.compile(r"\bstep \d+/(\d+)\b")  # training.callbacks.format_log_line
STOP_GRACE_S = 120.0  # how long a stopping run may take to save its checkpoint before it is killed


def train_command(config_path: Path, resume: bool = False) -> list[str]:
    """The CLI command, run with this interpreter so the UI and the run share one environment."""
    cmd = [sys.executable, "-m", "tunelab.cli.main", "train", str(config_path)]
    return cmd + ["--resume"] if resume else cmd


@dataclass
class TrainingJob:
    """One `tunelab train` process, its log file and the run folder it writes."""

    config_path: Path
    run_dir: Path
    log_path: Path
    total_steps: int | None = None  # from the config when max_steps is set; run.json may say more
    resume: bool = False
    process: subprocess.Popen | None = None
    started: float = field(default_factory=time.time)
    stop_requested: float | None = None

    @property
    def command(self) -> list[str]:
        return train_command(self.config_path, self.resume)

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                start_new_session=True,  # Ctrl-C in the UI's terminal must not also interrupt the run
            )

    @property
    def returncode(self) -> int | None:
        return None if self.process is None else self.process.poll()

    @property
    def running(self) -> bool:
        return self.process is not None and self.returncode is None

    @property
    def status(self) -> str:
        """running, stopping, finished, stopped or failed."""
        code = self.returncode
        if code is None:
            return "stopping" if self.stop_requested else "running"
        if code == 0:
            return "stopped" if self.stop_requested else "finished"
        return "stopped" if self.stop_requested and code in (130, -signal.SIGINT, 143, -signal.SIGTERM) else "failed"

    def stop(self) -> None:
        """Ask the trainer to stop: SIGINT, which `tunelab train` turns into "save a checkpoint and exit"
        (like Ctrl-C in a terminal). A run that does not exit within STOP_GRACE_S is terminated."""
        if not self.running or self.stop_requested:
            return
        self.stop_requested = time.time()
        self.process.send_signal(signal.SIGINT)
        threading.Thread(target=self._reap, name="tunelab-webui-stop", daemon=True).start()

    def _reap(self) -> None:
        try:
            self.process.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()

    def log_tail(self, chars: int = LOG_TAIL_CHARS) -> str:
        """The end of the log, with progress-bar carriage returns reduced to their last state per line."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - chars))
                raw = f.read().decode("utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(line.rsplit("\r", 1)[-1] for line in raw.split("\n"))

    def snapshot(self) -> dict[str, Any]:
        """Everything the page shows about the run now."""
        from tunelab.runs.read import read_history
        from tunelab.runs.rundir import RunDir, read_json

        history = read_history(self.run_dir)
        run_json = read_json(RunDir(self.run_dir).run_json)
        last = next((r for r in reversed(history) if "step" in r), {})
        total = run_json.get("max_steps") or self.total_steps or self._total_from_log()
        step = last.get("step", run_json.get("step", 0)) or 0
        if self.status == "finished" and total:
            step = max(step, total)
        status = self.status
        return {
            "status": status, "returncode": self.returncode, "step": step, "total": total,
            "eta_s": None if status != "running" else last.get("eta_s"),
            "elapsed_s": time.time() - self.started, "history": history, "run_json": run_json,
            "error": self.error_line(run_json) if status == "failed" else None,
        }

    def _total_from_log(self) -> int | None:
        """Total steps of an epoch-based run: the trainer's console line says "step N/TOTAL" (metrics.jsonl
        records do not carry the total)."""
        found = STEP_RE.findall(self.log_tail(4000))
        return int(found[-1]) if found else None

    def error_line(self, run_json: dict) -> str | None:
        """Why a run failed: training's own record in run.json, else the CLI's `error:` line in the log."""
        if run_json.get("error"):
            return str(run_json["error"])
        lines = [line for line in self.log_tail().splitlines() if line.strip()]
        found = [line for line in lines if line.startswith("error:")]
        return (found or lines or [None])[-1]


class JobRunner:
    """At most one training run per UI server (a laptop or one GPU rarely fits two)."""

    def __init__(self) -> None:
        self.job: TrainingJob | None = None
        self._lock = threading.Lock()

    def start(self, job: TrainingJob) -> TrainingJob:
        with self._lock:
            if self.job is not None and self.job.running:
                raise TunelabError("a training run is already going; stop it first")
            job.start()
            self.job = job
            return job

    def stop(self) -> TrainingJob | None:
        if self.job is not None:
            self.job.stop()
        return self.job

    def shutdown(self) -> None:
        """On UI exit: stop the run cleanly so it leaves a checkpoint."""
        if self.job is not None and self.job.running:
            self.job.stop()
