"""Cached keys/values of the [text | history] prefix for autoregressive sampling (an addition
to the paper: exact when history is modulated with the clean-level timestep)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from src.models.layers import attention


class KVCache:
    """Keys/values of a segment's prefix ([text | history]) at every attention layer.

    Filled by `PyramidDiT.encode_prefix` (mode "write"), then read by `forward_cached` (mode
    "read") for every denoising step of one (frame, stage): exact because prefix tokens never
    attend to the current frame (block-causal) and, with history_timestep="clean", do not
    depend on the step's timestep.
    """

    def __init__(self):
        self.keys: list[torch.Tensor] = []  # per layer (B, H, Np, Dh), RoPE applied
        self.values: list[torch.Tensor] = []
        self.key_valid: torch.Tensor | None = None  # (B, Np)
        self.num_frames = 0  # history frames: the current frame's temporal index
        self.text_vector: torch.Tensor | None = None  # (B, D) the caption's adaLN vector
        self.mode = "write"
        self._layer = 0

    def attend(self, q, k, v, layout, backend):
        """Attention of one layer; records (write) or prepends (read) the prefix keys/values."""
        if self.mode == "write":
            self.keys.append(k)
            self.values.append(v)
            return attention(q, k, v, layout, backend)
        kp, vp = self.keys[self._layer], self.values[self._layer]
        self._layer = (self._layer + 1) % len(self.keys)
        mask = torch.cat([self.key_valid, layout.key_valid], dim=1)[:, None, None]  # (B,1,1,N)
        return F.scaled_dot_product_attention(
            q, torch.cat([kp, k], dim=2), torch.cat([vp, v], dim=2), attn_mask=mask
        )
