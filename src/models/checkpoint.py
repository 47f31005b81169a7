"""Load a trained PyramidFlowModule safely (weights_only=True: no pickled code runs)."""

from __future__ import annotations

from pathlib import Path

import torch

from src.models.pyramid_module import PyramidFlowModule
from src.utils.checkpoint_io import read_checkpoint


def load_module(ckpt_path: str | Path, device: str | torch.device = "cpu") -> PyramidFlowModule:
    """Rebuild the module from the checkpoint's plain hyperparameters and load its weights.

    With the EMA callback active, the checkpoint's `state_dict` holds the EMA weights. A folder
    (the sharded checkpoint of an FSDP run) is gathered into one state_dict first.
    """
    ckpt = read_checkpoint(ckpt_path)
    if "hyper_parameters" not in ckpt or "state_dict" not in ckpt:
        raise ValueError(f"ckpt_path={ckpt_path} is not a PyramidFlowModule checkpoint")
    module = PyramidFlowModule(**ckpt["hyper_parameters"])
    module.configure_model()
    module.load_state_dict(ckpt["state_dict"])
    return module.to(device).eval()
