"""Load a trained PyramidFlowModule safely (weights_only=True: no pickled code runs)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from src.models.pyramid_module import PyramidFlowModule


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def load_module(ckpt_path: str | Path, device: str | torch.device = "cpu") -> PyramidFlowModule:
    """Rebuild the module from the checkpoint's plain hyperparameters and load its weights.

    With the EMA callback active, the checkpoint's `state_dict` holds the EMA weights.
    """
    path = Path(ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(
            f"ckpt_path={ckpt_path} does not exist; fix: pass a .ckpt written by src/train.py "
            "(e.g. logs/train/runs/<run>/checkpoints/last.ckpt)"
        )
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if "hyper_parameters" not in ckpt or "state_dict" not in ckpt:
        raise ValueError(f"ckpt_path={ckpt_path} is not a PyramidFlowModule checkpoint")
    module = PyramidFlowModule(**ckpt["hyper_parameters"])
    module.configure_model()
    module.load_state_dict(ckpt["state_dict"])
    return module.to(device).eval()
