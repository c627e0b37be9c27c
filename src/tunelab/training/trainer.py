"""Stage 4 (training): transformers' Trainer with two guarantees added: checkpoints appear atomically, and a
NaN/inf loss stops the run before the optimizer step that would spread it into the weights. With the
`sparse_logits` speed option it also computes the loss from trained positions only (training/speed.py).

A checkpoint is written under checkpoints/.staging/ and renamed into checkpoints/checkpoint-N only when every file
(model, optimizer, scheduler, RNG of every rank, trainer state) is there: a kill -9 at any moment leaves either the
complete checkpoint or none, never a corrupt "latest". Old checkpoints are renamed away before they are deleted.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from transformers import Trainer

from tunelab.models.quantized import refuse_training
from tunelab.patches.trainer_checkpoint import StagedCheckpointMixin, check_trainer_internals
from tunelab.patches.trainer_loss import loss_divisor, own_loss_allowed, scale_for_processes
from tunelab.runs.rundir import STAGING, TRAINER_STATE, checkpoint_name, checkpoint_step, complete_checkpoints
from tunelab.training.callbacks import NonFiniteLossError
from tunelab.training.speed import trained_token_loss


class TunelabTrainer(StagedCheckpointMixin, Trainer):
    """The private Trainer methods it relies on are overridden in tunelab.patches (version gated)."""

    def __init__(self, *args, keep_checkpoints: int | None = None, sparse_logits: bool = False, **kwargs):
        check_trainer_internals()
        refuse_training(kwargs.get("model", args[0] if args else None))  # a model.quantize (inference) model
        super().__init__(*args, **kwargs)
        self.keep_checkpoints = keep_checkpoints
        self.sparse_logits = sparse_logits

    # --------------------------------------------------------------------------------------------------- loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """With `sparse_logits`, the loss from logits at trained positions only (speed.trained_token_loss), the
        same value transformers computes from every position; anything else goes to the Trainer's own loss."""
        if not (self.sparse_logits and own_loss_allowed(self, inputs)):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        count = loss_divisor(self, num_items_in_batch)
        loss, outputs = trained_token_loss(model, inputs, count)
        loss = scale_for_processes(self, loss, count)
        return (loss, outputs) if return_outputs else loss

    # ------------------------------------------------------------------------------------------------ NaN guard
    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        finite = loss.detach().float().isfinite().reshape(1)
        if self.args.world_size > 1:  # every rank must stop together, else the others wait forever in all-reduce
            finite = self.accelerator.gather(finite)
        if not bool(finite.all()):
            raise NonFiniteLossError(self.state.global_step + 1, float(loss.detach().float().item()))
        return loss

    # ------------------------------------------------------------------------------------------ atomic checkpoint
    def save_checkpoint(self, model, trial) -> None:
        """Called by the Trainer where it saves a checkpoint (patches.trainer_checkpoint)."""
        root = Path(self.args.output_dir)
        staging = root / STAGING
        name = checkpoint_name(self.state.global_step)
        if self.args.should_save:
            shutil.rmtree(staging / name, ignore_errors=True)
            staging.mkdir(parents=True, exist_ok=True)
        self.accelerator.wait_for_everyone()
        self.write_checkpoint_into(staging, model, trial)
        best = self.state.best_model_checkpoint
        if best and Path(best).parent == staging:  # record where the checkpoint will live, not where it was built
            self.state.best_model_checkpoint = str(root / Path(best).name)
            if self.args.should_save:
                self.state.save_to_json(str(staging / name / TRAINER_STATE))
        self.accelerator.wait_for_everyone()  # every rank has written its RNG state
        if self.args.should_save:
            publish(staging / name, root / name, trash=staging)
            self._rotate(root, staging)
            _remove_if_empty(staging)
        self.accelerator.wait_for_everyone()

    def _rotate(self, root: Path, staging: Path) -> None:
        """Keep the newest `keep_checkpoints`, the best one, and the newest one PROVEN finite: checkpoint-N holds the
        weights the loss of step N+1 is computed on, so only once step N+1 gave a finite loss is it known to be
        good. The checkpoint of the step being saved now is not proven yet (its weights may be the ones a too
        large update just broke); the NaN guard then falls back to the proven one (`last_good_checkpoint`)."""
        if not self.keep_checkpoints:
            return
        found = sorted((s, p) for p in root.iterdir() if (s := checkpoint_step(p)) is not None)
        best = Path(self.state.best_model_checkpoint).name if self.state.best_model_checkpoint else None
        proven = last_good_checkpoint(root, self.state.global_step + 1)
        spared = {best, proven.name if proven else None}
        old = [p for _, p in found[: max(0, len(found) - self.keep_checkpoints)] if p.name not in spared]
        for path in old:
            remove_dir(path, trash=staging)


def last_good_checkpoint(checkpoints: Path, nonfinite_step: int) -> Path | None:
    """The newest checkpoint whose weights gave a finite loss, when the loss of step `nonfinite_step` was NaN/inf.

    The loss of step S is computed on the weights saved as checkpoint-(S-1); every step before S was finite, so
    checkpoint-(S-2) and older are proven good and checkpoint-(S-1) is the one whose weights gave the NaN.
    """
    good = [(step, p) for step, p in complete_checkpoints(checkpoints) if step <= nonfinite_step - 2]
    return max(good)[1] if good else None


def set_aside_nonfinite(checkpoints: Path, nonfinite_step: int) -> list[Path]:
    """Rename the checkpoints newer than the last good one to `nonfinite-checkpoint-N`, kept for inspection:
    `--resume` (which takes the newest checkpoint-N) then continues from weights that give a finite loss."""
    moved = []
    if not checkpoints.is_dir():
        return moved
    for path in sorted(checkpoints.iterdir()):
        step = checkpoint_step(path)
        if step is not None and step > nonfinite_step - 2:
            target = path.with_name(f"nonfinite-{path.name}")
            shutil.rmtree(target, ignore_errors=True)
            os.replace(path, target)
            moved.append(target)
    return moved


def publish(source: Path, target: Path, trash: Path) -> None:
    """Move a finished folder into place with one rename (replacing an older copy, if any)."""
    if target.exists():
        remove_dir(target, trash)
    os.replace(source, target)
    _fsync_dir(target.parent)


def remove_dir(path: Path, trash: Path) -> None:
    """Rename first, delete after: a kill during the delete leaves debris in the trash, not a broken checkpoint."""
    trash.mkdir(parents=True, exist_ok=True)
    doomed = trash / f"trash-{path.name}-{os.getpid()}"
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:  # not empty (another rank's debris) or already gone
        pass
