"""``LatentDataModule``: streams pre-extracted latent shards (``src/data/latent_shards.py``).

Shards live in ``<data_dir>/train`` and ``<data_dir>/val``, written by ``python src/extract.py``.
Streaming, epochs, resampling and rank splitting are those of ``WebVideoDataModule`` (shared
:class:`~src.data.webvideo_datamodule.ShardStreamDataModule`); batches are bucketed by latent
shape, so samples of different resolution or frame count never share a batch.

Batch contract::

    {"latent": FloatTensor (B, C, t, h, w), raw (un-normalised; the autoencoder's
               ``normalize`` maps it to what the DiT sees),
     "text": {"tokens": FloatTensor (B, L, D), "mask": BoolTensor (B, L),
              "pooled": FloatTensor (B, Dp)},
     "caption": list[str] (B),
     "meta": list[dict] (B; the sample's json plus "key" and "url")}
"""

from __future__ import annotations

from pathlib import Path

from src.data.latent_shards import (
    LatentDecoder,
    ShapeBuckets,
    collate_latents,
    load_autoencoder_state,
    load_null_text,
    read_latent_manifest,
)
from src.data.pipeline import Batcher
from src.data.shards import shard_files
from src.data.text_features import TextFeatures
from src.data.webvideo_datamodule import ShardStreamDataModule

# manifest fields that train and val must share: same latent space, same text features
_SHARED = ("latent_channels", "autoencoder", "text_encoder")


class LatentDataModule(ShardStreamDataModule):
    """Pre-extracted latents and text features for text-to-video training.

    Attributes (after :meth:`setup`):
        manifest: the train split's manifest (the val split's for validation-only use).
        null_text: ``TextFeatures`` of batch 1 for the empty prompt, computed at extraction
            with the same text encoder (classifier-free-guidance dropout needs it).
        autoencoder_state: fitted autoencoder buffers (PCA) stored with the shards, or None.

    Args:
        data_dir: root holding ``train/`` and ``val/`` latent split folders.
        batch_size: samples per batch on each device (all of one latent shape).
        num_workers: DataLoader worker processes (0 decodes in the main process).
        shuffle_buffer: samples in the training shuffle buffer.
        batches_per_epoch: training batches per epoch on every rank.
        val_batches: validation batches per rank.
        seed: seed of the data streams (shard sampling, shuffling).
        max_bad_fraction: share of bad samples per stream that stops the run (see pipeline).
    """

    def __init__(
        self,
        data_dir: str,
        batch_size: int = 8,
        num_workers: int = 0,
        shuffle_buffer: int = 500,
        batches_per_epoch: int = 500,
        val_batches: int = 2,
        seed: int = 0,
        max_bad_fraction: float = 0.25,
    ):
        super().__init__()
        self.save_hyperparameters(logger=False)
        self.data_dir = Path(data_dir)
        self.manifests: dict[str, dict] = {}
        self.null_text: TextFeatures | None = None
        self.autoencoder_state: dict | None = None

    @property
    def manifest(self) -> dict | None:
        return self.manifests.get("train", self.manifests.get("val"))

    def collate(self, samples: list[dict]) -> dict:
        return collate_latents(samples)

    def batcher(self, batch_size: int) -> Batcher:
        return ShapeBuckets(batch_size)

    def _urls(self, split: str) -> list[str]:
        split_dir = self.data_dir / split
        try:
            manifest = read_latent_manifest(split_dir)
        except (FileNotFoundError, ValueError) as exn:
            raise type(exn)(f"data.data_dir={str(self.data_dir)!r}: {exn}") from None
        self._register(split, manifest)
        files = shard_files(split_dir)
        if not files:
            raise FileNotFoundError(
                f"data.data_dir={str(self.data_dir)!r}: {split_dir} has a manifest but no "
                "*.tar shards; fix: re-extract them with `python src/extract.py`"
            )
        return [str(f) for f in files]

    def _register(self, split: str, manifest: dict) -> None:
        """Keep the split's manifest and decoder; train and val must share one latent space."""
        for other, seen in self.manifests.items():
            for field in _SHARED:
                if other != split and seen.get(field) != manifest.get(field):
                    raise ValueError(
                        f"data.data_dir={str(self.data_dir)!r}: the {split} and {other} "
                        f"manifests disagree on {field}; extract both splits in one "
                        "`python src/extract.py` run"
                    )
        self.manifests[split] = manifest
        decoder = LatentDecoder(
            manifest,
            train=split == "train",
            seed=self.hparams.seed,
            max_bad_fraction=self.hparams.max_bad_fraction,
        )
        if split == "train":
            self.train_decoder = decoder
        else:
            self.val_decoder = decoder
        if split == "train" or self.null_text is None:
            split_dir = self.data_dir / split
            self.null_text = TextFeatures(**load_null_text(split_dir))
            self.autoencoder_state = load_autoencoder_state(split_dir, manifest)
