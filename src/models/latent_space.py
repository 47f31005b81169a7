"""The latent space a DiT trains in: fit a data-fitted autoencoder (the PCA) on training
videos, or adopt the one recorded with pre-extracted latent shards (refusing shards that were
made by another autoencoder)."""

from __future__ import annotations

import torch
from torch import nn


def fit_autoencoder(ae: nn.Module, trainer, cfg: dict, device) -> float | None:
    """Fit `ae` on `cfg["fit_samples"]` training videos unless it needs no fit or already has
    one (a resumed or fine-tuned checkpoint). Every rank fits, then rank 0's buffers are
    broadcast so all ranks share one latent space. Returns the explained variance, or None."""
    if not getattr(ae, "requires_fit", False) or ae.is_fitted:
        return None
    need = cfg.get("fit_samples", 512)
    videos, seen = [], 0
    for batch in trainer.datamodule.train_dataloader():
        videos.append(batch["video"])
        seen += batch["video"].shape[0]
        if seen >= need:
            break
    ae.fit(torch.cat(videos).to(device))
    state = trainer.strategy.broadcast({k: v.cpu() for k, v in ae.state_dict().items()})
    ae.load_state_dict(state)
    return ae.explained_variance_ratio


def adopt_latent_dataset(ae: nn.Module, dm, device) -> None:
    """Pre-extracted latents: restore a fitted autoencoder's state from the shard set and check
    that the latents were made by this autoencoder (its describe() fingerprint)."""
    state = getattr(dm, "autoencoder_state", None)
    if getattr(ae, "requires_fit", False) and not ae.is_fitted:
        if state is None:
            raise ValueError(
                f"the autoencoder ({type(ae).__name__}) must be fitted but the latent shards "
                "carry no autoencoder.safetensors; re-run src/extract.py"
            )
        ae.load_state_dict({k: v.to(device) for k, v in state.items()})
    made_by = dm.manifest.get("autoencoder") or {}  # its describe() record
    mine = ae.describe()
    if made_by and made_by.get("fingerprint") != mine["fingerprint"]:
        raise ValueError(
            f"the latent shards were extracted with autoencoder {made_by.get('class')} "
            f"(fingerprint {made_by.get('fingerprint')}) but the configured autoencoder is "
            f"{mine['class']} (fingerprint {mine['fingerprint']}); fix: use the same "
            "autoencoder config/checkpoint or re-extract with src/extract.py"
        )
