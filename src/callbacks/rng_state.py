"""Carry the random-number generators' states in checkpoints, so a resumed run draws the same
noise, timesteps and dropout masks as an uninterrupted one (Lightning saves model, optimizer,
schedulers, loops and callbacks, but not the global RNGs).

Saved: torch's CPU generator, every CUDA generator, numpy's and Python's, as tensors and plain
lists (checkpoints stay loadable with ``weights_only=True``). The data streams have their own
seeded generators (``src.data.pipeline``), which are re-derived from the epoch on resume.
The loaded states are applied at ``on_train_start``, after every set-up hook (which may draw
random numbers, e.g. the peak-FLOP measurement), just before the first resumed step.
"""

from __future__ import annotations

import random

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback


class RNGState(Callback):
    def __init__(self):
        self._pending: dict | None = None

    def state_dict(self) -> dict:
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        version, state, gauss_next = random.getstate()
        return {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
            "python": [version, list(state), gauss_next],
        }

    def load_state_dict(self, state_dict: dict) -> None:
        self._pending = state_dict

    def on_train_start(self, trainer, pl_module) -> None:
        if self._pending is not None:
            self._restore(self._pending)
            self._pending = None

    @staticmethod
    def _restore(state_dict: dict) -> None:
        torch.set_rng_state(state_dict["torch"])
        if state_dict["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state_dict["cuda"])
        kind, keys, pos, has_gauss, gauss = state_dict["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
        version, state, gauss_next = state_dict["python"]
        random.setstate((version, tuple(state), gauss_next))
