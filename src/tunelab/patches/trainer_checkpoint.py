"""Patch: transformers Trainer's private `_save_checkpoint(model, trial)` and `_get_output_dir(trial)`.

What: `TunelabTrainer` (training/trainer.py) builds every checkpoint in a staging folder and renames it into place
once complete (atomic checkpoints). The Trainer has no public hook for where a checkpoint is written: it calls the
private `_save_checkpoint` from `_maybe_log_save_evaluate`, and `_save_checkpoint` asks the private
`_get_output_dir` for the folder it writes `checkpoint-N` (model, optimizer, scheduler, RNG, trainer state) into.
This mixin overrides both, so that the private names live here only:
- `_save_checkpoint` calls the subclass's `save_checkpoint(model, trial)` (tunelab's staging / publish / rotation);
- `write_checkpoint_into(folder, model, trial)` runs the Trainer's own `_save_checkpoint` with `_get_output_dir`
  answering `folder`.
Checked: transformers 5.x (tested 5.24.0). Outside that range the Trainer refuses to start (`check_trainer_internals`):
without the redirect a checkpoint could be written straight into checkpoints/ and a kill leave a corrupt "latest".
"""

from __future__ import annotations

from pathlib import Path

from tunelab.patches import TRANSFORMERS, require_checked


def check_trainer_internals() -> None:
    require_checked(TRANSFORMERS, "atomic checkpoints (Trainer._save_checkpoint / _get_output_dir)")


class StagedCheckpointMixin:
    """Put before `transformers.Trainer` in the bases; the subclass defines `save_checkpoint(model, trial)`."""

    _checkpoint_root: Path | None = None

    def _get_output_dir(self, trial) -> str:
        if self._checkpoint_root is not None:
            return str(self._checkpoint_root)
        return super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        self.save_checkpoint(model, trial)

    def save_checkpoint(self, model, trial) -> None:  # the subclass's policy; by default the Trainer's own
        super()._save_checkpoint(model, trial)

    def write_checkpoint_into(self, folder: Path, model, trial) -> None:
        """The Trainer's complete checkpoint (`folder/checkpoint-<global_step>`), written under `folder`."""
        self._checkpoint_root = Path(folder)
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._checkpoint_root = None
