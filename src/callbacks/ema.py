"""Exponential moving average of the weights, on Lightning's WeightAveraging callback.

Validation runs on the EMA weights, checkpoints store them under `state_dict` (the raw weights
under `current_model_state`, so resuming continues both), and sampling uses them. Lightning's
averaging keeps a full copy of the module, so it cannot hold a sharded (FSDP) model: it refuses
one loudly instead of averaging shards silently.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import EMAWeightAveraging


class EMA(EMAWeightAveraging):
    def __init__(self, decay: float = 0.999, update_every_n_steps: int = 1, start_step: int = 0):
        super().__init__(
            decay=decay,
            update_every_n_steps=update_every_n_steps,
            update_starting_at_step=start_step,
        )

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        name = type(trainer.strategy).__name__
        if "FSDP" in name or "ModelParallel" in name:
            raise ValueError(
                f"callbacks.ema cannot average a sharded model (trainer.strategy={name}); "
                "fix: remove it with `~callbacks.ema` or use strategy=ddp"
            )
        super().setup(trainer, pl_module, stage)

    def _ready(self) -> bool:
        """True once the average holds real weights (the first update copies the model).

        Before that the copy still has the initial weights (and, for a data-fitted
        autoencoder, unfitted buffers): it must not be swapped in, saved or copied back.
        """
        return self._average_model is not None and int(self._average_model.n_averaged) > 0

    def averaged_module(self) -> L.LightningModule | None:
        """The module holding the EMA weights, or None until the first EMA update."""
        return self._average_model.module if self._ready() else None

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        if self._ready():
            super().on_validation_epoch_start(trainer, pl_module)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if self._ready():
            super().on_validation_epoch_end(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self._ready():
            super().on_train_end(trainer, pl_module)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        if self._ready():
            super().on_save_checkpoint(trainer, pl_module, checkpoint)
