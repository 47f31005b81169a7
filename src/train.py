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
from src.utils.config_checks import config_notices, validate_config  # noqa: E402

log = RankedLogger(__name__)


def checkpoint_step(path: Path) -> int:
    """The global step of a complete, readable checkpoint; ValueError saying why not otherwise.

    Reads the pickle and the zip directory (tensors are memory-mapped, not read), or for a
    sharded folder its meta.pt and the .metadata that torch.distributed.checkpoint writes last.
    """
    if path.is_dir():
        if not (path / ".metadata").is_file():
            raise ValueError("a sharded folder without .metadata (its save did not finish)")
        path = path / "meta.pt"
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # truncated zip, bad pickle, unreadable file
        raise ValueError(
            f"unreadable ({type(err).__name__}: {str(err).splitlines()[0][:100]})"
        ) from None
    if not isinstance(ckpt, dict) or "global_step" not in ckpt:
        raise ValueError("no global_step in it (not a training checkpoint)")
    return int(ckpt["global_step"])


def resolve_ckpt_path(cfg: DictConfig) -> str | None:
    """`ckpt_path=last`: resume this run folder's newest loadable checkpoint.

    last.ckpt when it is readable (the usual case: nothing else is opened); otherwise, with one
    line per damaged file, the readable checkpoint with the highest global step among
    last.ckpt.old (a kill between the two renames of a sharded save) and step_*.ckpt. No
    checkpoint at all: a new run. Checkpoints that are all damaged: one line and a stop (a new
    run would overwrite them).
    """
    if cfg.get("ckpt_path") != "last":
        return cfg.get("ckpt_path")
    folder = Path(cfg.paths.output_dir) / "checkpoints"
    last = folder / "last.ckpt"
    if last.exists():  # a file, or a directory for sharded (FSDP) checkpoints
        try:
            checkpoint_step(last)
            log.info(f"Resuming from {last}")
            return str(last)
        except ValueError as problem:
            log.warning(f"{last} is {problem}: looking for the previous good checkpoint")
    others = [folder / "last.ckpt.old", *sorted(folder.glob("step_*.ckpt"))]
    good, damaged = [], [last] if last.exists() else []
    for path in (p for p in others if p.exists()):
        try:
            good.append((checkpoint_step(path), path.name.startswith("last"), path))
        except ValueError as problem:
            damaged.append(path)
            log.warning(f"{path} is {problem}: skipped")
    if good:
        step, _, path = max(good)
        log.info(f"Resuming from {path} (global step {step}, the newest loadable checkpoint)")
        return str(path)
    if damaged:
        raise RuntimeError(
            f"ckpt_path=last: none of the {len(damaged)} checkpoints in {folder} can be read; "
            "fix: move them away to start a new run, or pass ckpt_path=PATH to a good copy"
        )
    log.info(f"ckpt_path=last but {last} does not exist yet: starting a new run")
    return None


@task_wrapper
def train(cfg: DictConfig) -> dict:
    if cfg.get("dry_run"):  # size the run on the meta device; build and load nothing
        validate_config(cfg, check_files=False)
        from src.utils.preflight import report

        return report(cfg)
    validate_config(cfg)
    for notice in config_notices(cfg):
        log.warning(notice)
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
    job_dir = Path(HydraConfig.get().runtime.output_dir)
    key = cfg.get("optimized_metric", "val/loss")
    done = job_dir / "DONE.json"
    if multirun and cfg.get("skip_finished") and done.is_file():  # a resumed sweep
        log.info(f"{job_dir} finished before (DONE.json): skipped (skip_finished=true)")
        return json.loads(done.read_text())["metrics"].get(key)
    if multirun and rank_zero_only.rank == 0:  # a rerun job starts without its old failure
        (job_dir / "FAILED.json").unlink(missing_ok=True)
    try:
        metrics = train(cfg)
    except Exception as exn:
        if not multirun:
            raise
        out = record_failure(exn)  # a failing job must not abort the rest of a sweep
        log.error(f"job failed, sweep continues: {type(exn).__name__}: {exn} ({out})")
        return None
    if multirun and cfg.get("train", True) and rank_zero_only.rank == 0:
        done.write_text(json.dumps({"overrides": list(HydraConfig.get().overrides.task),
                                    "metrics": metrics}, indent=1))  # fmt: skip
    return metrics.get(key)


if __name__ == "__main__":
    main()
