"""Text conditioning of the DiT: the frozen prompt encoder, the empty prompt and the
classifier-free-guidance dropout of training (a caption replaced by the empty prompt with
probability `cfg_dropout`, so one network learns both branches that guidance combines)."""

from __future__ import annotations

import torch

from src.data.text_features import TextFeatures
from src.models.text_encoders import TextEncoder, build_text_encoder, text_encoder_class


class TextConditioner:
    """Prompts or pre-extracted features -> TextFeatures on the model's device.

    The encoder is built on first use: training on pre-extracted features never loads it (a
    T5-XXL is 9 GB) unless prompts must be encoded (sample videos, evaluation). A plain object,
    not an nn.Module, so the frozen encoder stays out of checkpoints.
    """

    def __init__(self, encoder_cfg: dict, cfg_dropout: float = 0.0):
        if not 0.0 <= cfg_dropout < 1.0:
            raise ValueError(
                f"model.cfg_dropout={cfg_dropout} must be in [0, 1); fix: e.g. 0.1 (the paper's "
                "rate of dropped captions for classifier-free guidance)"
            )
        text_encoder_class(encoder_cfg)  # a bad `_target_` fails now, not at the first prompt
        self.encoder_cfg, self.cfg_dropout = dict(encoder_cfg), cfg_dropout
        self._encoder: TextEncoder | None = None
        self.null_text: TextFeatures | None = None  # stored empty-prompt features, if any

    @property
    def encoder(self) -> TextEncoder:
        if self._encoder is None:
            self._encoder = build_text_encoder(**self.encoder_cfg)
        return self._encoder

    def dropout_mask(self, batch_size: int) -> torch.Tensor:
        """(B,) bool: the training rows whose caption is replaced by the empty prompt."""
        return torch.rand(batch_size) < self.cfg_dropout

    def null_features(self, batch_size: int) -> TextFeatures:
        """Empty-prompt features: stored with pre-extracted features, else encoded once."""
        if self.null_text is not None:
            return self.null_text.expand(batch_size)
        return self.encoder.empty_features(batch_size)

    def drop(self, feats: TextFeatures, drop: torch.Tensor | None, device) -> TextFeatures:
        """Rows where `drop` is True get the empty prompt's features; moved to `device`."""
        if drop is not None and bool(drop.any()):
            feats = feats.where(~drop, self.null_features(len(feats)))
        return feats.to(device)

    def encode(self, prompts: list[str], device, drop: torch.Tensor | None = None) -> TextFeatures:
        return self.drop(self.encoder.encode(prompts), drop, device)

    def batch(self, batch: dict, device, drop: torch.Tensor | None = None) -> TextFeatures:
        """Text features of a batch: pre-extracted (``batch["text"]``) or encoded captions."""
        if batch.get("text") is not None:
            t = batch["text"]
            feats = TextFeatures(t["tokens"].float(), t["mask"].bool(), t["pooled"].float())
            return self.drop(feats, drop, device)
        return self.encode(batch["caption"], device, drop)
