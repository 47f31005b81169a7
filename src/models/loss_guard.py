"""Skip non-finite or spiking training losses; stop after too many in a row.

The reference training skips a step whose loss is above 2.0 (at its latent scale) instead of
stepping into it; here the threshold is `model.loss_guard.max_loss` (null: only non-finite
losses are skipped). After `max_consecutive` bad steps in a row the run saves the weights from
before them and stops with one line saying what to change.
"""

from __future__ import annotations

from pathlib import Path

import torch


class LossGuard:
    def __init__(self, max_loss: float | None = None, max_consecutive: int = 20):
        if max_consecutive < 1:
            raise ValueError(
                f"model.loss_guard.max_consecutive={max_consecutive} must be >= 1; fix: e.g. 20"
            )
        self.max_loss, self.max_consecutive = max_loss, int(max_consecutive)
        self.bad_in_a_row, self.skipped = 0, 0

    def is_bad(self, loss: torch.Tensor) -> bool:
        return not bool(torch.isfinite(loss)) or (
            self.max_loss is not None and loss.item() > self.max_loss
        )

    def skips(self, loss: torch.Tensor, trainer=None) -> bool:
        """True: skip this step (every rank agrees). Raises after max_consecutive skips."""
        bad = self.is_bad(loss)
        if trainer is not None:
            bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        if not bad:
            self.bad_in_a_row = 0
            return False
        self.bad_in_a_row += 1
        self.skipped += 1
        if self.bad_in_a_row >= self.max_consecutive:
            path = None
            if trainer is not None:
                path = Path(trainer.default_root_dir) / "checkpoints" / "last_good.ckpt"
                trainer.save_checkpoint(path)  # weights untouched by the skipped steps
            raise RuntimeError(
                f"the training loss was non-finite or above model.loss_guard.max_loss="
                f"{self.max_loss} for {self.max_consecutive} steps in a row (last "
                f"{float(loss.detach()):.4g}); the weights from before them are in {path}; fix: "
                "lower model.optim.lr, check the data, or raise model.loss_guard.max_consecutive"
            )
        return True
