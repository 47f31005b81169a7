"""Write sample videos for fixed prompts and seeds every N steps (rank zero only), and score
them with the digits benchmark (`val/digits_*`) when the prompts are digits captions."""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import WandbLogger

from src.callbacks.ema import EMA
from src.models import generation
from src.utils.visualize import save_frame_strip


class SampleVideo(L.Callback):
    """samples/step_{step:08d}/{prompt_idx:02d}.mp4 + strip.png in the run folder (+ W&B)."""

    def __init__(
        self,
        prompts: list[str],
        every_n_steps: int = 1000,
        seed: int = 0,
        fps: int = 8,
        on_train_end: bool = True,
        digits_metrics: bool = False,
    ):
        self.prompts, self.every, self.seed, self.fps = list(prompts), every_n_steps, seed, fps
        self.at_end, self.digits_metrics = on_train_end, digits_metrics
        if digits_metrics:
            from src.data.digits import parse_caption

            bad = [p for p in self.prompts if parse_caption(p) is None]
            if bad:  # not the digits world: no digits scores, no crash mid-run
                warnings.warn(
                    f"callbacks.sample_video.digits_metrics=true but {bad[0]!r} is not a "
                    "digits caption; the val/digits_* scores are skipped",
                    stacklevel=2,
                )
                self.digits_metrics = False
        self.last_written = -1  # with gradient accumulation a step spans several batches

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every > 0 and step % self.every == 0 and step > 0 and step != self.last_written:
            self.write(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if getattr(pl_module, "_preempted", False):
            return  # preempted: no time for sample videos before the job is killed
        if self.at_end and trainer.global_step != self.last_written:
            self.write(trainer, pl_module)

    def write(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Path | None:
        """Rank zero writes; with a sharded model every rank must join the forward passes."""
        self.last_written = trainer.global_step
        sharded = "ModelParallel" in type(trainer.strategy).__name__
        if not (trainer.is_global_zero or sharded):
            return None
        module = pl_module
        for cb in trainer.callbacks:  # prefer the EMA weights while training
            if isinstance(cb, EMA) and cb.averaged_module() is not None and trainer.training:
                module = cb.averaged_module()
        latents = module.generate_latents(self.prompts, seed=self.seed)
        videos = module.decode_latents(latents)  # latents kept for the blockiness score
        if not trainer.is_global_zero:
            return None
        from src.eval.blockiness import blockiness

        block = {  # period 2: the last stage jump; period 4: the first one (K = 3)
            "val/blockiness": float(blockiness(latents, 2).mean()),
            "val/blockiness_4": float(blockiness(latents, 4).mean()),
        }
        for lg in trainer.loggers:
            lg.log_metrics(block, step=trainer.global_step)
        out = Path(trainer.default_root_dir) / "samples" / f"step_{trainer.global_step:08d}"
        out.mkdir(parents=True, exist_ok=True)
        paths = [out / name for name in generation.write_videos(out, videos, 0, self.fps, 2)]
        save_frame_strip(videos, out / "strip.png")
        if self.digits_metrics:
            from src.data.video_io import to_uint8_frames
            from src.eval.digits_bench import score_videos

            scores = score_videos([to_uint8_frames(v) for v in videos], self.prompts)
            metrics = {f"val/digits_{k}": float(v) for k, v in scores.items() if k != "videos"}
            for lg in trainer.loggers:
                lg.log_metrics(metrics, step=trainer.global_step)
        for lg in trainer.loggers:
            if isinstance(lg, WandbLogger):
                import wandb

                lg.experiment.log(
                    {
                        "samples": [
                            wandb.Video(str(p), caption=c) for p, c in zip(paths, self.prompts)
                        ]
                    },
                    step=trainer.global_step,
                )
        return out
