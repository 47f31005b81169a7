"""The container of encoded prompts that text encoders produce, latent shards store and the DiT
consumes (tokens, mask, pooled), with the batch operations classifier-free guidance needs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(eq=False)
class TextFeatures:
    """Encoded prompts.

    Attributes:
        tokens: ``(B, L, D)`` float per-token features; zero where ``mask`` is False.
        mask: ``(B, L)`` bool, True for real tokens (at least one per row).
        pooled: ``(B, Dp)`` float sentence vector.
    """

    tokens: Tensor
    mask: Tensor
    pooled: Tensor

    def __post_init__(self) -> None:
        b, length = self.mask.shape
        if self.tokens.shape[:2] != (b, length) or self.pooled.shape[0] != b:
            raise ValueError(
                f"TextFeatures shapes disagree: tokens {tuple(self.tokens.shape)}, mask "
                f"{tuple(self.mask.shape)}, pooled {tuple(self.pooled.shape)}; expected "
                "(B, L, D), (B, L), (B, Dp)"
            )

    def __len__(self) -> int:
        return self.mask.shape[0]

    @property
    def batch_size(self) -> int:
        return self.mask.shape[0]

    def to(self, device=None, dtype: torch.dtype | None = None, non_blocking: bool = False):
        """Move to ``device`` and cast the float tensors to ``dtype`` (the mask stays bool)."""
        return TextFeatures(
            tokens=self.tokens.to(device=device, dtype=dtype, non_blocking=non_blocking),
            mask=self.mask.to(device=device, non_blocking=non_blocking),
            pooled=self.pooled.to(device=device, dtype=dtype, non_blocking=non_blocking),
        )

    def expand(self, batch_size: int) -> TextFeatures:
        """A batch-1 TextFeatures repeated to ``batch_size`` rows (read-only views)."""
        return TextFeatures(
            tokens=self.tokens.expand(batch_size, -1, -1),
            mask=self.mask.expand(batch_size, -1),
            pooled=self.pooled.expand(batch_size, -1),
        )

    def select(self, index) -> TextFeatures:
        """Rows ``index`` (int, slice, list, long or bool tensor), keeping the batch dim."""
        if isinstance(index, int):
            index = slice(index, index + 1 if index != -1 else None)
        return TextFeatures(self.tokens[index], self.mask[index], self.pooled[index])

    __getitem__ = select

    @staticmethod
    def cat(features: Sequence[TextFeatures]) -> TextFeatures:
        """Concatenate along the batch dimension (same ``L``, ``D``, ``Dp``)."""
        if not features:
            raise ValueError("TextFeatures.cat needs at least one TextFeatures")
        return TextFeatures(
            tokens=torch.cat([f.tokens for f in features]),
            mask=torch.cat([f.mask for f in features]),
            pooled=torch.cat([f.pooled for f in features]),
        )

    def where(self, keep: Tensor, other: TextFeatures) -> TextFeatures:
        """Per row: ``self`` where ``keep`` (``(B,)`` bool) else ``other`` (batch B or 1).

        Used for classifier-free-guidance dropout:
        ``feats.where(~drop, encoder.empty_features(1))``.
        """
        keep = keep.to(device=self.mask.device, dtype=torch.bool)
        if keep.shape != (self.batch_size,):
            raise ValueError(f"keep has shape {tuple(keep.shape)}; expected ({self.batch_size},)")
        other = other.to(self.mask.device)
        return TextFeatures(
            tokens=torch.where(keep[:, None, None], self.tokens, other.tokens),
            mask=torch.where(keep[:, None], self.mask, other.mask),
            pooled=torch.where(keep[:, None], self.pooled, other.pooled),
        )
