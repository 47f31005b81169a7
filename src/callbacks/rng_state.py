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
from lightning.pytorch.utilities import rank_zero_warn


def _local_state() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, state, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "python": [version, list(state), gauss_next],
    }


def _restore(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, state_, gauss_next = state["python"]
    random.setstate((version, tuple(state_), gauss_next))


class RNGState(Callback):
    """Every rank's states are gathered into the checkpoint (ranks are seeded differently);
    on resume each rank takes its own. With a different world size the fresh per-rank seeding
    is kept (and said so)."""

    def __init__(self):
        self._pending: dict | None = None

    def state_dict(self) -> dict:
        import torch.distributed as dist

        local = _local_state()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            ranks = [None] * dist.get_world_size()
            dist.all_gather_object(ranks, local)  # every rank dumps the checkpoint state
            return {"ranks": ranks}
        return {"ranks": [local]}

    def load_state_dict(self, state_dict: dict) -> None:
        self._pending = state_dict

    def on_train_start(self, trainer, pl_module) -> None:
        if self._pending is None:
            return
        ranks = self._pending.get("ranks", [self._pending])  # older checkpoints: one state
        self._pending = None
        if len(ranks) != trainer.world_size:
            rank_zero_warn(
                f"RNG states of {len(ranks)} ranks in the checkpoint, {trainer.world_size} now: "
                "keeping the fresh per-rank seeding (the run stays valid, not bit-identical)"
            )
            return
        _restore(ranks[trainer.global_rank])
