"""Preemption: SIGUSR1 (what SLURM sends `--signal=USR1@N` seconds before the time limit) or
SIGTERM make the run finish its current optimizer step, write last.ckpt at once and stop
cleanly. After SIGUSR1 under SLURM the job is requeued (`scontrol requeue $SLURM_JOB_ID`,
after the checkpoint exists) and resumes with `ckpt_path=last`; SIGTERM (`scancel`, a node
shutting down) saves and stops without requeueing, so a cancelled job stays cancelled.

The signal handler only records the signal (no I/O inside a handler). At every step boundary
the ranks agree (any rank's signal counts; a requeue if any rank got a requeue signal). The
checkpoint goes through the ModelCheckpoint callback's last.ckpt (so it is not written twice),
or an explicit save when the run has none; the end-of-training sample videos are skipped. These
handlers replace Lightning's SLURM SIGUSR1 handler (its hpc checkpoint is not what
`ckpt_path=last` reads).

Under submitit (`launcher=slurm`; the job environment has SUBMITIT_EXECUTOR=slurm) the warning
signal is submitit's preemption signal (SIGUSR2 unless SUBMITIT_PREEMPT_SIGNAL says otherwise),
whose handler would checkpoint the *submission*, requeue and exit at once, in the middle of a
step and without a training checkpoint. This callback takes that signal over too: the step in
flight finishes, last.ckpt is written, and only then is submitit's own handler called (at
teardown, once), so the job is requeued exactly once, by submitit, and resumes from the
checkpoint just written; `scontrol requeue` is not used for it. SIGTERM stays a cancel.
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
    def __init__(
        self,
        signals: tuple[str, ...] = ("SIGTERM", "SIGUSR1"),
        requeue_signals: tuple[str, ...] = ("SIGUSR1",),
        requeue: bool = True,
    ):
        self.signals = [getattr(signal, s) for s in signals]
        self.requeue_signals = {getattr(signal, s) for s in requeue_signals}
        self.requeue = requeue
        self.received: int | None = None
        self.stopping = False
        self._previous: dict[int, object] = {}
        self._submitit_signal = self._submitit_preempt_signal()
        self._submitit_requeue = None  # submitit's handler, called once the checkpoint exists

    @staticmethod
    def _submitit_preempt_signal() -> int | None:
        """The signal submitit requeues on in this job (None outside a submitit SLURM job)."""
        if os.environ.get("SUBMITIT_EXECUTOR") != "slurm":
            return None
        name = os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
        return getattr(signal, f"SIG{name}", None)

    def _handler(self, signum, frame) -> None:
        self.received = signum

    def on_train_start(self, trainer, pl_module) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        signals = list(self.signals)
        if self._submitit_signal is not None and self._submitit_signal not in signals:
            signals.append(self._submitit_signal)
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handler)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.stopping or (batch_idx + 1) % trainer.accumulate_grad_batches:
            return  # act on optimizer-step boundaries only (no half-accumulated gradients)
        strategy = trainer.strategy
        if not strategy.reduce_boolean_decision(self.received is not None, all=False):
            return
        requeue = strategy.reduce_boolean_decision(
            self.received in self.requeue_signals, all=False
        )
        submitit = strategy.reduce_boolean_decision(
            self.received is not None and self.received == self._submitit_signal, all=False
        )
        self.stopping = True
        pl_module._preempted = True  # SampleVideo skips its end-of-training videos
        name = signal.Signals(self.received).name if self.received else "a signal on another rank"
        job = self._slurm_job() if (requeue and self.requeue and not submitit) else None
        if submitit and self.requeue:  # submitit requeues (its handler), after our checkpoint
            previous = self._previous.get(self._submitit_signal)
            self._submitit_requeue = previous if callable(previous) else None
        log.warning(
            f"received {name} at step {trainer.global_step}: writing last.ckpt and stopping"
            + (f"; requeueing SLURM job {job}" if job else "")
            + ("; submitit requeues the job once the run has stopped" if submitit else "")
        )
        last = [c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)]
        last = [c for c in last if c.save_last]
        if last:  # records the step, so the epoch-end refresh does not write it again
            last[0]._save_last_checkpoint(trainer, last[0]._monitor_candidates(trainer))
        else:
            trainer.save_checkpoint(Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt")
        if job and trainer.is_global_zero:  # after the checkpoint exists: requeue ends the job
            res = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
            if res.returncode:
                log.warning(f"scontrol requeue {job} failed: {res.stderr.strip()}")
        trainer.should_stop = True

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore_handlers()

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._restore_handlers()
        handler, self._submitit_requeue = self._submitit_requeue, None
        if handler is not None:  # submitit: requeue (rank 0) and exit, exactly once
            handler(self._submitit_signal, None)

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
