"""Checkpointing that never leaves last.ckpt behind the final step."""

from __future__ import annotations

import shutil
from pathlib import Path

from lightning.pytorch.callbacks import ModelCheckpoint


class StepCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that also refreshes last.ckpt at the end of every training epoch.

    With step-based saving (`every_n_train_steps`) and an integer `val_check_interval`,
    Lightning writes last.ckpt only when a step checkpoint is written, so a run stopping between
    two intervals (max_steps, max_time, a FLOP budget) would leave last.ckpt at an older step.
    The fit loop ends an epoch whenever training stops, before `on_train_end` (where the EMA
    callback copies its weights into the model), so the raw and EMA weights are both saved
    as they are.

    ``keep_last``: keep only the newest k step checkpoints (files, or sharded folders), pruned
    on rank 0 after each save; None keeps them all. (Lightning's own top-k needs a monitored
    metric, and monitoring ``step`` changes when it saves, which breaks exact resumption.)
    """

    def __init__(self, *args, keep_last: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if keep_last is not None and keep_last < 1:
            raise ValueError(
                f"callbacks.model_checkpoint.keep_last={keep_last} must be >= 1 or null (keep all)"
            )
        self.keep_last = keep_last

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        if self.keep_last is None or not trainer.is_global_zero or self.dirpath is None:
            return
        steps = sorted(Path(self.dirpath).glob("step_*.ckpt"))  # zero-padded: by step
        for old in steps[: -self.keep_last]:
            shutil.rmtree(old) if old.is_dir() else old.unlink(missing_ok=True)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
