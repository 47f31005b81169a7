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
    """Send `signal` (a name, e.g. SIGTERM) to this process when training reaches `step`
    (only on global rank `rank` when given: a signal that reaches one rank of a job)."""

    def __init__(self, step: int, signal: str = "SIGTERM", rank: int | None = None):
        self.step, self.signal, self.sent, self.rank = step, signal, False, rank

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.rank is not None and trainer.global_rank != self.rank:
            return
        if trainer.global_step >= self.step and not self.sent:
            self.sent = True
            os.kill(os.getpid(), getattr(signal, self.signal))


class FakeSubmititHandler(Callback):
    """Stand-in for submitit's preemption handler (installed before training, as submitit does
    before it runs the job): records each call in the file `record` and exits like submitit's
    requeue."""

    def __init__(self, record: str, signal: str = "SIGUSR2"):
        self.record, self.signal = record, signal

    def setup(self, trainer, pl_module, stage: str) -> None:
        def requeue_and_exit(signum, frame):
            with open(self.record, "a") as fh:
                fh.write(f"requeue {signal.Signals(signum).name}\n")
            raise SystemExit(255)  # submitit: requeue, then sys.exit(-1)

        signal.signal(getattr(signal, self.signal), requeue_and_exit)
