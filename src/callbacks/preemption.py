"""Preemption: SIGTERM or SIGUSR1 (what SLURM sends before killing a job) make the run finish
its current step, write last.ckpt and stop cleanly; under SLURM the job is requeued
(`scontrol requeue $SLURM_JOB_ID`) and resumes with `ckpt_path=last`.

The signal handler only records the signal (no I/O inside a handler); the checkpoint is written
at the next step boundary, where every rank agrees to stop (any rank's signal counts). The
checkpoint is last.ckpt of the ModelCheckpoint callback (written when the stopping epoch ends),
or an explicit save when the run has none. These handlers replace Lightning's SLURM SIGUSR1
handler (which would write a separate hpc checkpoint that `ckpt_path=last` does not read).
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from pathlib import Path

from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from src.utils.pylogger import RankedLogger

log = RankedLogger(__name__, rank_zero_only=True)


class Preemption(Callback):
    def __init__(self, signals: tuple[str, ...] = ("SIGTERM", "SIGUSR1"), requeue: bool = True):
        self.signals = [getattr(signal, s) for s in signals]
        self.requeue = requeue
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def _handler(self, signum, frame) -> None:
        self.received = signum

    def on_train_start(self, trainer, pl_module) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handler)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        stop = trainer.strategy.reduce_boolean_decision(self.received is not None, all=False)
        if not stop:
            return
        name = signal.Signals(self.received).name if self.received else "a signal on another rank"
        log.warning(
            f"received {name} at step {trainer.global_step}: writing last.ckpt and stopping"
            + (" (the SLURM job is requeued)" if self._slurm_job() else "")
        )
        if not any(isinstance(c, ModelCheckpoint) and c.save_last for c in trainer.callbacks):
            trainer.save_checkpoint(Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt")
        trainer.should_stop = True  # the epoch ends now; ModelCheckpoint writes last.ckpt

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore_handlers()
        job = self._slurm_job()
        if self.received is not None and job and self.requeue and trainer.is_global_zero:
            res = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
            if res.returncode:
                log.warning(f"scontrol requeue {job} failed: {res.stderr.strip()}")

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._restore_handlers()

    def _restore_handlers(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    @staticmethod
    def _slurm_job() -> str | None:
        """The job id `scontrol requeue` takes (array jobs: JOBID_TASKID), or None."""
        job, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
        if job and task:
            return f"{job}_{task}"
        return os.environ.get("SLURM_JOB_ID")
