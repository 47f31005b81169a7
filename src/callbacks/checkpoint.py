"""Checkpointing that never leaves last.ckpt behind the final step."""

from __future__ import annotations

from lightning.pytorch.callbacks import ModelCheckpoint


class StepCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that also refreshes last.ckpt at the end of every training epoch.

    With step-based saving (`every_n_train_steps`) and an integer `val_check_interval`,
    Lightning writes last.ckpt only when a step checkpoint is written, so a run stopping between
    two intervals (max_steps, max_time, a FLOP budget) would leave last.ckpt at an older step.
    The fit loop ends an epoch whenever training stops, before `on_train_end` (where the EMA
    callback copies its weights into the model), so the raw and EMA weights are both saved
    as they are.
    """

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
