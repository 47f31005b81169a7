"""Test-only callbacks that inject faults into real training processes (used by the slow tier
through `+callbacks.fault._target_=tests.fault_injection.KillAtStep`)."""

from __future__ import annotations

import os
import signal

from lightning.pytorch.callbacks import Callback


class KillAtStep(Callback):
    """SIGKILL this process when training reaches `step` (no cleanup, no checkpoint)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class SignalAtStep(Callback):
    """Send `signal` (a name, e.g. SIGTERM) to this process when training reaches `step`."""

    def __init__(self, step: int, signal: str = "SIGTERM"):
        self.step, self.signal, self.sent = step, signal, False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step >= self.step and not self.sent:
            self.sent = True
            os.kill(os.getpid(), getattr(signal, self.signal))
