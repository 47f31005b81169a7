"""Entry-point helpers: config extras, instantiation of callbacks/loggers, a task wrapper."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from pathlib import Path

import hydra
from lightning import Callback
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, OmegaConf

from src.utils.pylogger import RankedLogger

log = RankedLogger(__name__)


def print_config_tree(cfg: DictConfig, save_to: Path | None = None) -> None:
    """Pretty-print the resolved config with rich and save it next to the run."""
    import rich
    import rich.syntax
    import rich.tree

    tree = rich.tree.Tree("CONFIG", style="dim")
    for key, value in cfg.items():
        branch = tree.add(str(key))
        text = (
            OmegaConf.to_yaml(value, resolve=True) if isinstance(value, DictConfig) else str(value)
        )
        branch.add(rich.syntax.Syntax(text, "yaml"))
    rich.print(tree)
    if save_to is not None:
        save_to.write_text(OmegaConf.to_yaml(cfg, resolve=True))


def extras(cfg: DictConfig) -> None:
    ex = cfg.get("extras") or {}
    if ex.get("ignore_warnings"):
        warnings.filterwarnings("ignore")
    if ex.get("print_config"):
        out = cfg.paths.get("output_dir")
        print_config_tree(cfg, Path(out) / "config_tree.yaml" if out else None)


def _instantiate_group(cfg: DictConfig | None, kind: type, name: str) -> list:
    objs = []
    if not cfg:
        return objs
    for key, conf in cfg.items():
        if isinstance(conf, DictConfig) and "_target_" in conf:
            obj = hydra.utils.instantiate(conf)
            if not isinstance(obj, kind):
                raise TypeError(
                    f"{name}.{key} built a {type(obj).__name__}, not a {kind.__name__}"
                )
            objs.append(obj)
    return objs


def instantiate_callbacks(cfg: DictConfig | None) -> list[Callback]:
    return _instantiate_group(cfg, Callback, "callbacks")


def instantiate_loggers(cfg: DictConfig | None) -> list[Logger]:
    return _instantiate_group(cfg, Logger, "logger")


def task_wrapper(fn: Callable) -> Callable:
    """Log the output folder on success and failure; re-raise failures (multiruns record them)."""

    @functools.wraps(fn)
    def wrapped(cfg: DictConfig):
        try:
            return fn(cfg)
        except Exception:
            log.exception("Task failed")
            raise
        finally:
            log.info(f"Output dir: {cfg.paths.output_dir}")

    return wrapped
