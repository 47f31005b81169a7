"""Shared fixtures: the real train.yaml composed with the tiny CPU experiment."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

import src.utils  # noqa: F401  (registers the configs' OmegaConf resolvers)

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "configs")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")


def compose_train(
    overrides: list[str] | None = None, return_hydra_config: bool = True
) -> DictConfig:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(
            "train.yaml", overrides=overrides or [], return_hydra_config=return_hydra_config
        )


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory) -> Path:
    """Digits shards for the tiny experiment, rendered once per session."""
    from src.data.shards import write_digits_shards

    root = tmp_path_factory.mktemp("data")
    write_digits_shards(
        root / "shards" / "digits", num_train=16, num_val=8, samples_per_shard=8, seed=0
    )
    return root


def tiny_cfg(tmp_path: Path, data_root: Path, extra: list[str] | None = None) -> DictConfig:
    cfg = compose_train(
        [
            "experiment=tiny",
            f"paths.data_dir={data_root}",
            f"hydra.run.dir={tmp_path}",
            *(extra or []),
        ]
    )
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
        cfg.paths.log_dir = str(tmp_path)
    HydraConfig().set_config(cfg)
    return cfg


@pytest.fixture
def cfg_train(tmp_path, tiny_data_dir) -> DictConfig:
    yield tiny_cfg(tmp_path, tiny_data_dir)
    GlobalHydra.instance().clear()
