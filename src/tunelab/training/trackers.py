"""Stage 4 (training): experiment trackers. TensorBoard always (tunelab's own writer into <run>/tb); wandb, swanlab
and mlflow through transformers' `report_to` integrations, started here first so they log into the run folder and
work offline (the integrations reuse a run that is already active instead of starting their own).
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

from tunelab.errors import TunelabError

KNOWN = ("tensorboard", "wandb", "swanlab", "mlflow")
PROJECT = "tunelab"


def check_trackers(report_to: list[str]) -> None:
    """Unknown or uninstalled trackers are errors before anything is loaded."""
    for name in report_to:
        if name not in KNOWN:
            raise TunelabError(f"train.report_to: unknown tracker {name!r}; known: {', '.join(KNOWN)}")
        if importlib.util.find_spec(name) is None:
            raise TunelabError(
                f"train.report_to lists {name}, which is not installed: pip install {name} "
                "(or pip install 'tunelab[trackers]'), or remove it from train.report_to"
            )


def tensorboard_callback(tb_dir: Path, purge_step: int | None = None):
    """`purge_step`: on resume, TensorBoard hides what the interrupted run logged from that step on."""
    from torch.utils.tensorboard import SummaryWriter
    from transformers.integrations import TensorBoardCallback

    if purge_step is not None:
        wait_for_a_later_event_file_name(tb_dir)
    return TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(tb_dir), purge_step=purge_step))


def wait_for_a_later_event_file_name(tb_dir: Path) -> None:
    """TensorBoard reads a folder's event files in name order, and a name starts with the second it was created
    (then host and pid). A resume within the same second as the interrupted run can get a name that sorts first:
    its purge then comes before the old steps it should hide, and the curve reads 3,4,5,6,1,2. Wait for the next
    second so the resumed file always sorts last."""
    stamps = [int(p.name.split(".")[3]) for p in Path(tb_dir).glob("events.out.tfevents.*")
              if len(p.name.split(".")) > 4 and p.name.split(".")[3].isdigit()]
    while stamps and int(time.time()) <= max(stamps):
        time.sleep(0.05)


def start_trackers(report_to: list[str], run_dir: Path, run_name: str, config: dict, offline: bool) -> list[str]:
    """Start the external trackers' runs (main process only); returns the names for TrainingArguments.report_to."""
    external = [name for name in report_to if name != "tensorboard"]
    for name in external:
        {"wandb": _start_wandb, "swanlab": _start_swanlab, "mlflow": _start_mlflow}[name](
            run_dir, run_name, config, offline
        )
    return external


def finish_trackers(report_to: list[str]) -> None:
    if "wandb" in report_to:
        import wandb

        if wandb.run is not None:
            wandb.finish()
    if "swanlab" in report_to and _swanlab_run() is not None:
        import swanlab

        swanlab.finish()


def _start_wandb(run_dir: Path, run_name: str, config: dict, offline: bool) -> None:
    import wandb

    if wandb.run is None:
        wandb.init(project=PROJECT, name=run_name, dir=str(run_dir), config=config,
                   mode="offline" if offline else None)


def _swanlab_run():
    import swanlab

    try:
        return swanlab.get_run()
    except RuntimeError:  # swanlab >= 0.10 raises instead of returning None when no run is active
        return None


def _start_swanlab(run_dir: Path, run_name: str, config: dict, offline: bool) -> None:
    import swanlab

    if _swanlab_run() is None:
        swanlab.init(project=PROJECT, name=run_name, log_dir=str(run_dir / "swanlog"), config=config,
                     mode="offline" if offline else None)


def _start_mlflow(run_dir: Path, run_name: str, config: dict, offline: bool) -> None:
    """A sqlite store in the run folder (mlflow 3 refuses the plain file store) unless the user set a server."""
    import os

    import mlflow

    if os.environ.get("MLFLOW_TRACKING_URI"):
        return
    mlflow.set_tracking_uri(f"sqlite:///{(run_dir / 'mlflow.db').resolve()}")
    if mlflow.get_experiment_by_name(PROJECT) is None:
        mlflow.create_experiment(PROJECT, artifact_location=(run_dir / "mlflow-artifacts").resolve().as_uri())
    mlflow.set_experiment(PROJECT)
