"""Load a trained PyramidFlowModule safely (weights_only=True: no pickled code runs)."""

from __future__ import annotations

from pathlib import Path

import torch

from src.models.pyramid_module import PyramidFlowModule
from src.utils.checkpoint_io import read_checkpoint


def load_module(
    ckpt_path: str | Path,
    device: str | torch.device = "cpu",
    autoencoder: dict | None = None,
    dtype: torch.dtype | None = None,
) -> PyramidFlowModule:
    """Rebuild the module from the checkpoint's plain hyperparameters and load its weights.

    With the EMA callback active, the checkpoint's `state_dict` holds the EMA weights. A folder
    (the sharded checkpoint of an FSDP run) is gathered into one state_dict first.
    autoencoder: settings that change how, not what, it computes (e.g. tile, chunk_latents);
    dtype: the DiT's weights are cast to it (e.g. torch.bfloat16: half the memory).
    """
    ckpt = read_checkpoint(ckpt_path)
    if "hyper_parameters" not in ckpt or "state_dict" not in ckpt:
        raise ValueError(f"ckpt_path={ckpt_path} is not a PyramidFlowModule checkpoint")
    hp = dict(ckpt["hyper_parameters"])
    if autoencoder:
        hp["autoencoder"] = {**hp["autoencoder"], **autoencoder}
    module = PyramidFlowModule(**hp)
    module.configure_model()
    module.load_state_dict(ckpt["state_dict"])
    if dtype is not None:
        module.net.to(dtype)
    return module.to(device).eval()
