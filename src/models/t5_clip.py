"""The paper's text conditioning: T5 encoder tokens (128, masked) + a pooled CLIP vector.

Loaded through ``transformers`` from local directories only (no Hub downloads); tests use tiny
randomly initialised configs of the same classes. Registered as ``text_encoder.name=t5_clip``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from src.data.text_features import TextFeatures
from src.models.text_encoders import TextEncoder, _check_dims, _quiet_hf_loading


def _local_model_dir(field: str, path: str | None, what: str) -> str:
    """Check that ``path`` is a local model directory (config.json), else a one-line error."""
    if path is None or not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(
            f"text_encoder.{field}={None if path is None else str(path)!r} has no config.json: "
            f"point it at a local {what} directory (model + tokenizer, e.g. written by "
            "save_pretrained); weights are never downloaded"
        )
    return str(path)


class T5CLIPTextEncoder(TextEncoder):
    """T5 encoder tokens plus a CLIP pooled vector (the paper's SD3-style conditioning).

    ``tokens`` are the last hidden states of ``transformers.T5EncoderModel`` (run with the
    attention mask, zero at padding), ``max_length`` tokens with the closing ``</s>``;
    ``pooled`` is ``transformers.CLIPTextModel``'s ``pooler_output`` (final-layer-normed state
    at the end-of-text token) of the prompt truncated to CLIP's own length (77). Models and
    tokenizers are read from local directories with ``local_files_only=True``; the dimensions
    are checked against their ``config.json`` at construction and the weights load on first use
    (or by :meth:`load`).

    Args:
        t5_path: local T5 (encoder) directory, e.g. ``google/t5-v1_1-xxl`` or an SD3 pipeline's
            ``text_encoder_3``.
        clip_path: local CLIP text (or full CLIP) directory, e.g. ``openai/clip-vit-large-patch14``
            or an SD3 pipeline's ``text_encoder``.
        max_length: ``L`` in T5 tokens (longer prompts are truncated).
        dtype: ``"float32"`` or ``"bfloat16"`` weights; float32 (default) suits the CPU, bfloat16
            halves the memory of T5-XXL on a GPU. Features are returned as CPU float32 either way.
        device: where the transformers run.
        cache_size: most prompts kept in the cache (LRU), ``None`` for unbounded.
        dim: optional, must equal T5's ``d_model`` (written in configs for interpolation).
        pooled_dim: optional, must equal CLIP's ``hidden_size``.
        t5_tokenizer_path: tokenizer directory when it is not ``t5_path`` (SD3: ``tokenizer_3``).
        clip_tokenizer_path: tokenizer directory when it is not ``clip_path`` (SD3: ``tokenizer``).
    """

    DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

    def __init__(
        self,
        t5_path: str,
        clip_path: str,
        max_length: int = 128,
        dtype: str = "float32",
        device: str = "cpu",
        cache_size: int | None = 10_000,
        dim: int | None = None,
        pooled_dim: int | None = None,
        t5_tokenizer_path: str | None = None,
        clip_tokenizer_path: str | None = None,
    ) -> None:
        super().__init__(max_length, cache_size)
        from transformers import CLIPTextConfig, T5Config

        if dtype not in self.DTYPES:
            raise ValueError(
                f"text_encoder.dtype={dtype!r} is unknown: choose one of {list(self.DTYPES)}"
            )
        self.t5_path = _local_model_dir("t5_path", t5_path, "T5 encoder")
        self.clip_path = _local_model_dir("clip_path", clip_path, "CLIP text model")
        self.t5_tokenizer_path = t5_tokenizer_path or self.t5_path
        self.clip_tokenizer_path = clip_tokenizer_path or self.clip_path
        t5_config = T5Config.from_pretrained(self.t5_path, local_files_only=True)
        clip_config = CLIPTextConfig.from_pretrained(self.clip_path, local_files_only=True)
        _check_dims(
            f"the T5 at {self.t5_path!r} / CLIP at {self.clip_path!r}",
            dim,
            pooled_dim,
            t5_config.d_model,
            clip_config.hidden_size,
        )
        self.dim, self.pooled_dim = t5_config.d_model, clip_config.hidden_size
        self.clip_max_length = clip_config.max_position_embeddings
        self.dtype = self.DTYPES[dtype]
        self.device = torch.device(device)
        self._t5 = self._clip = self._t5_tokenizer = self._clip_tokenizer = None

    def load(self) -> T5CLIPTextEncoder:
        """Load both tokenizers and models from the local directories (never the network)."""
        if self._t5 is not None:
            return self
        from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

        with _quiet_hf_loading():
            t5_tokenizer = AutoTokenizer.from_pretrained(
                self.t5_tokenizer_path, local_files_only=True
            )
            clip_tokenizer = AutoTokenizer.from_pretrained(
                self.clip_tokenizer_path, local_files_only=True
            )
            t5 = T5EncoderModel.from_pretrained(
                self.t5_path, dtype=self.dtype, local_files_only=True
            )
            clip = CLIPTextModel.from_pretrained(
                self.clip_path, dtype=self.dtype, local_files_only=True
            )
        for model in (t5, clip):
            model.requires_grad_(False).eval().to(self.device)
        self._t5_tokenizer, self._clip_tokenizer = t5_tokenizer, clip_tokenizer
        self._t5, self._clip = t5, clip
        return self

    @property
    def t5(self):
        """The frozen ``T5EncoderModel`` (loads on first access)."""
        return self.load()._t5

    @property
    def clip(self):
        """The frozen ``CLIPTextModel`` (loads on first access)."""
        return self.load()._clip

    def to(self, device) -> T5CLIPTextEncoder:
        """Run the transformers on ``device`` (outputs and cache stay on the CPU)."""
        self.device = torch.device(device)
        for model in (self._t5, self._clip):
            if model is not None:
                model.to(self.device)
        return self

    def _tokenize(self, tokenizer, prompts: list[str], max_length: int) -> tuple[Tensor, Tensor]:
        batch = tokenizer(
            prompts,
            padding="max_length",
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        return batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)

    @torch.inference_mode()
    def _encode_batch(self, prompts: list[str]) -> TextFeatures:
        self.load()
        ids, mask = self._tokenize(self._t5_tokenizer, prompts, self.max_length)  # (B, L)
        hidden = self._t5(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, L, D)
        tokens = hidden.float() * mask[..., None]  # (B, L, D), zero at padding
        clip_ids, clip_mask = self._tokenize(self._clip_tokenizer, prompts, self.clip_max_length)
        pooled = self._clip(input_ids=clip_ids, attention_mask=clip_mask).pooler_output  # (B, Dp)
        return TextFeatures(tokens.cpu(), mask.bool().cpu(), pooled.float().cpu())
