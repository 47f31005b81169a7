"""Train a pyramidal flow matching video model: `python src/train.py [group=option] [k=v]`."""

from __future__ import annotations

import json
import traceback
from pathlib import Path

import hydra
import lightning as L
import rootutils
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

rootutils.setup_root(__file__, indicator=".project-root", pythonpath=True)

from src.utils import (  # noqa: E402
    RankedLogger,
    extras,
    instantiate_callbacks,
    instantiate_loggers,
    task_wrapper,
)
from src.utils.config_checks import validate_config  # noqa: E402

log = RankedLogger(__name__)


def resolve_ckpt_path(cfg: DictConfig) -> str | None:
    """`ckpt_path=last` resumes this run folder's last.ckpt when it exists (else starts fresh)."""
    if cfg.get("ckpt_path") != "last":
        return cfg.get("ckpt_path")
    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    if last.exists():  # a file, or a directory for sharded (FSDP) checkpoints
        log.info(f"Resuming from {last}")
        return str(last)
    old = last.with_name(last.name + ".old")  # a kill between the two renames of a sharded save
    if old.is_dir():
        log.info(f"Resuming from {old} (the save that replaced it did not finish)")
        return str(old)
    log.info(f"ckpt_path=last but {last} does not exist yet: starting a new run")
    return None


@task_wrapper
def train(cfg: DictConfig) -> dict:
    if cfg.get("dry_run"):  # size the run on the meta device; build and load nothing
        validate_config(cfg, check_files=False)
        from src.utils.preflight import report

        return report(cfg)
    validate_config(cfg)
    L.seed_everything(cfg.seed, workers=True)
    torch.set_float32_matmul_precision("high")

    log.info(f"Instantiating datamodule <{cfg.data._target_}>")
    datamodule: L.LightningDataModule = hydra.utils.instantiate(cfg.data)
    if cfg.get("train", True) and hasattr(datamodule, "check_sources"):
        datamodule.check_sources()  # missing/empty shard folders fail before a model is built
    log.info(f"Instantiating model <{cfg.model._target_}>")
    model: L.LightningModule = hydra.utils.instantiate(cfg.model)
    callbacks = instantiate_callbacks(cfg.get("callbacks"))
    loggers = instantiate_loggers(cfg.get("logger"))
    trainer: L.Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers)
    for lg in loggers:
        lg.log_hyperparams({"run_name": cfg.run_name, "tags": list(cfg.tags), **model.hparams})

    if cfg.get("train", True):
        trainer.fit(
            model, datamodule=datamodule, ckpt_path=resolve_ckpt_path(cfg), weights_only=True
        )
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    out = Path(cfg.paths.output_dir)
    log.info(f"Checkpoints: {out / 'checkpoints'}")
    log.info(f"Samples: {out / 'samples'}   Metrics: {out / 'csv' / 'metrics.csv'}")
    return metrics


def record_failure(exn: BaseException) -> Path:
    """Write <job dir>/FAILED.json (error, traceback, overrides) and append it to the sweep's
    failures.jsonl, so a multirun goes on and `src/report.py` lists the failed job."""
    hc = HydraConfig.get()
    out = Path(hc.runtime.output_dir)
    if rank_zero_only.rank != 0:  # one record per job, not one per rank
        return out
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "job": hc.job.num,
        "overrides": list(hc.overrides.task),
        "error": f"{type(exn).__name__}: {exn}",
        "traceback": traceback.format_exc(),
    }
    (out / "FAILED.json").write_text(json.dumps(record, indent=1))
    with open(Path(hc.sweep.dir) / "failures.jsonl", "a") as f:
        f.write(json.dumps({k: record[k] for k in ("job", "overrides", "error")}) + "\n")
    return out


@hydra.main(version_base="1.3", config_path="../configs", config_name="train.yaml")
def main(cfg: DictConfig) -> float | None:
    extras(cfg)
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    if multirun and rank_zero_only.rank == 0:  # a rerun job starts without its old failure
        (Path(HydraConfig.get().runtime.output_dir) / "FAILED.json").unlink(missing_ok=True)
    try:
        metrics = train(cfg)
    except Exception as exn:
        if not multirun:
            raise
        out = record_failure(exn)  # a failing job must not abort the rest of a sweep
        log.error(f"job failed, sweep continues: {type(exn).__name__}: {exn} ({out})")
        return None
    return metrics.get(cfg.get("optimized_metric", "val/loss"))


if __name__ == "__main__":
    main()
