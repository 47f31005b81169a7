"""Model-free checkpoint IO: read a checkpoint file or sharded folder safely (weights_only=True:
no pickled code runs) and fingerprint it. Knows nothing of the LightningModule."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file, or of a sharded checkpoint folder (its files' names and bytes, sorted)."""
    h, path = hashlib.sha256(), Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            h.update(str(file.relative_to(path)).encode())
        with open(file, "rb") as f:
            while block := f.read(chunk):
                h.update(block)
    return h.hexdigest()


def load_sharded(path: Path) -> dict:
    """A sharded (FSDP, torch.distributed.checkpoint) checkpoint folder as one checkpoint dict:
    its meta.pt (hyperparameters, step) with the gathered full state_dict (weights_only)."""
    import tempfile

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    meta = torch.load(path / "meta.pt", map_location="cpu", weights_only=True)
    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(path, Path(tmp) / "full.pt")
        full = torch.load(Path(tmp) / "full.pt", map_location="cpu", weights_only=True)
    return {**meta, "state_dict": full["state_dict"]}


def read_checkpoint(ckpt_path: str | Path) -> dict:
    """A checkpoint dict from a .ckpt file or a sharded (FSDP) folder, loaded on the CPU."""
    path = Path(ckpt_path)
    if path.is_dir() and (path / "meta.pt").is_file():
        return load_sharded(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"ckpt_path={ckpt_path} does not exist; fix: pass a .ckpt written by src/train.py "
            "(e.g. logs/train/runs/<run>/checkpoints/last.ckpt)"
        )
    return torch.load(path, map_location="cpu", weights_only=True)
