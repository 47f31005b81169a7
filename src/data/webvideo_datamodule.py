"""``WebVideoDataModule``: streams webdataset mp4 shards as fixed-size clip batches.

Shards live in ``<data_dir>/train/*.tar`` and ``<data_dir>/val/*.tar`` (written by
``src/data/shards.py``).
Training is a resampled, infinite stream cut into epochs of exactly ``batches_per_epoch``
batches on every rank (``WebLoader(...).with_epoch``), so no ``len()`` and no
DistributedSampler are involved. Validation reads its shards in order, split by rank, and
yields exactly ``val_batches`` batches per rank (repeating its shards when there are fewer).
Batches follow the contract in ``src/data/pipeline.py``. :class:`ShardStreamDataModule` holds
the streaming logic shared with the latent shards' ``LatentDataModule``.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from itertools import islice
from pathlib import Path

import torch
import webdataset as wds
from lightning import LightningDataModule

from src.data.pipeline import (
    Batcher,
    ClipDecoder,
    SampleDecoder,
    collate_clips,
    train_pipeline,
    val_pipeline,
)
from src.data.shards import read_manifest, shard_files, write_digits_shards


class _EpochCountingLoader(wds.WebLoader):
    """WebLoader that counts the epochs actually started in this process (an iterator counts
    once it yields its first batch; a bare ``iter()``, as in Lightning's checks, does not)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.epochs_started = 0

    def __iter__(self):
        it = super().__iter__()

        def counted():
            for i, batch in enumerate(it):
                if i == 0:
                    self.epochs_started += 1
                yield batch

        return counted()


class ShardStreamDataModule(LightningDataModule, ABC):
    """Streams of webdataset shards in ``<data_dir>/{train,val}``: the parts every format shares.

    Subclasses set ``data_dir``, ``train_decoder`` and ``val_decoder`` (:class:`SampleDecoder`),
    implement :meth:`_urls` and keep ``batch_size``, ``num_workers``, ``shuffle_buffer``,
    ``batches_per_epoch``, ``val_batches`` and ``seed`` in their hparams. They may override
    :meth:`collate` and :meth:`batcher` (how samples become batches).
    """

    data_dir: Path
    train_decoder: SampleDecoder | None = None
    val_decoder: SampleDecoder | None = None

    def __init__(self):
        super().__init__()
        self.train_urls: list[str] = []
        self.val_urls: list[str] = []
        self._first_epoch = 0  # the stream epoch the train loader started at
        self._resume_epoch: int | None = None  # from a checkpoint (load_state_dict)
        self._train_loader: _EpochCountingLoader | None = None

    def state_dict(self) -> dict:
        """The next unused epoch of the training stream (a resumed run starts there: a fresh
        epoch, never a replay, however often the run is resumed)."""
        started = self._train_loader.epochs_started if self._train_loader is not None else 0
        return {"next_stream_epoch": self._first_epoch + started}

    def load_state_dict(self, state_dict: dict) -> None:
        self._resume_epoch = int(state_dict["next_stream_epoch"])

    @property
    def skipped(self) -> dict[str, dict[str, int]]:
        """Samples skipped in this process so far, by split and reason."""
        return {
            split: dict(decoder.skipped) if decoder is not None else {}
            for split, decoder in (("train", self.train_decoder), ("val", self.val_decoder))
        }

    def collate(self, samples: list[dict]) -> dict:
        """Decoded samples -> one batch (used by :meth:`fixed_val_batch`)."""
        return collate_clips(samples)

    def batcher(self, batch_size: int) -> Batcher | None:
        """The pipeline's batching stage; ``None``: full batches of :meth:`collate`."""
        return None

    @abstractmethod
    def _urls(self, split: str) -> list[str]:
        """Shard URLs of ``split`` ("train" or "val")."""

    def _world_size(self) -> int:
        if self.trainer is not None:
            return self.trainer.world_size
        return int(os.environ.get("WORLD_SIZE", 1))

    def check_sources(self) -> None:
        """Before any model is built: every split that training reads must have readable
        shards (one line naming data.data_dir and the fix otherwise). Read-only."""
        for split in ("train", "val"):
            if not self._generated_later(split):
                self._urls(split)

    def _generated_later(self, split: str) -> bool:
        """True when prepare_data will write the split's missing shards."""
        return False

    def setup(self, stage: str | None = None) -> None:
        """Find the shard URLs; fail fast, in one line, when a needed split has none."""
        if stage in (None, "fit"):
            self.train_urls = self._urls("train")
        self.val_urls = self._urls("val")
        self._check_val_per_rank(self._world_size())

    def _check_val_per_rank(self, world: int) -> None:
        """Every rank must get at least one full val batch, or DDP validation would hang."""
        if len(self.val_urls) < world:
            raise ValueError(
                f"data.data_dir={str(self.data_dir)!r}: {len(self.val_urls)} val shards for "
                f"{world} ranks; write at least one val shard per rank (lower "
                "data.samples_per_shard and regenerate)"
            )
        manifest = read_manifest(self.data_dir / "val") or {}
        counts = {s["file"]: s["num_samples"] for s in manifest.get("shards", [])}
        names = [Path(u).name for u in self.val_urls]
        if not counts or set(names) != set(counts):
            return  # no manifest (hand-made shards): nothing to check against
        per_rank = min(sum(counts[n] for n in names[r::world]) for r in range(world))
        if per_rank < self.hparams.batch_size:
            raise ValueError(
                f"data.batch_size={self.hparams.batch_size} but a rank only gets {per_rank} "
                f"val samples from {self.data_dir / 'val'}; lower data.batch_size or write "
                "more val samples"
            )

    def _loader(self, dataset, num_workers: int, num_batches: int) -> wds.WebLoader:
        loader = _EpochCountingLoader(
            dataset,
            batch_size=None,  # batches are formed inside the workers
            num_workers=num_workers,
            persistent_workers=num_workers > 0,  # workers keep their epoch counters
            # its own generator: creating an iterator draws a base seed, which must not move
            # the training RNG (a resumed run would otherwise draw different noise)
            generator=torch.Generator().manual_seed(int(self.hparams.seed)),
        )
        return loader.with_epoch(num_batches)

    def train_dataloader(self) -> wds.WebLoader:
        hp = self.hparams
        if not self.train_urls:
            self.setup("fit")
        first_epoch = 0
        if self._resume_epoch is not None:  # resumed: the next unused epoch of the stream
            first_epoch = self._resume_epoch
        elif self.trainer is not None:  # a checkpoint without datamodule state: estimate it
            done = self.trainer.global_step * self.trainer.accumulate_grad_batches
            first_epoch = -(-done // hp.batches_per_epoch)
        self._first_epoch = first_epoch
        dataset = train_pipeline(
            self.train_urls,
            self.train_decoder,
            hp.batch_size,
            hp.shuffle_buffer,
            hp.seed,
            first_epoch=first_epoch,  # a fresh epoch of the stream, never a replay
            batcher=self.batcher(hp.batch_size),
        )
        self._train_loader = self._loader(dataset, hp.num_workers, hp.batches_per_epoch)
        return self._train_loader

    def val_dataloader(self) -> wds.WebLoader:
        hp = self.hparams
        if not self.val_urls:
            self.setup("validate")
        dataset = val_pipeline(
            self.val_urls, self.val_decoder, hp.batch_size, batcher=self.batcher(hp.batch_size)
        )
        per_rank = -(-len(self.val_urls) // self._world_size())
        return self._loader(dataset, min(hp.num_workers, per_rank), hp.val_batches)

    def fixed_val_batch(self, n: int) -> dict:
        """The first ``n`` validation samples (all val shards, in order) as one batch."""
        if not self.val_urls:
            self.setup("validate")
        dataset = val_pipeline(self.val_urls, self.val_decoder, None, split_by_node=False)
        samples = list(islice(iter(dataset), n))
        if len(samples) < n:
            raise ValueError(
                f"fixed_val_batch({n}): data.data_dir={str(self.data_dir)!r} has only "
                f"{len(samples)} usable val samples; ask for fewer"
            )
        return self.collate(samples)


class WebVideoDataModule(ShardStreamDataModule):
    """Webdataset video clips for text-to-video training.

    Args:
        data_dir: shard root holding ``train/`` and ``val/`` folders of ``*.tar`` shards.
        generate_digits: when a split has no shards, render the moving-digits dataset there in
            ``prepare_data`` (with ``num_train``, ``num_val``, ``samples_per_shard``, ``seed``).
        batch_size: clips per batch on each device.
        num_workers: DataLoader worker processes (0 decodes in the main process).
        num_frames: frames per clip.
        height: clip height in pixels.
        width: clip width in pixels.
        shuffle_buffer: samples in the training shuffle buffer.
        batches_per_epoch: training batches per epoch on every rank.
        val_batches: validation batches per rank.
        seed: seed of the data streams (shard sampling, shuffling, temporal crops) and of the
            generated dataset.
        num_train: generated training videos.
        num_val: generated validation videos.
        samples_per_shard: generated videos per shard.
    """

    def __init__(
        self,
        data_dir: str,
        generate_digits: bool = False,
        batch_size: int = 8,
        num_workers: int = 0,
        num_frames: int = 17,
        height: int = 64,
        width: int = 64,
        shuffle_buffer: int = 500,
        batches_per_epoch: int = 500,
        val_batches: int = 2,
        seed: int = 0,
        num_train: int = 4000,
        num_val: int = 256,
        samples_per_shard: int = 250,
        max_bad_fraction: float = 0.25,
    ):
        super().__init__()
        self.save_hyperparameters(logger=False)
        self.data_dir = Path(data_dir)
        self.train_decoder, self.val_decoder = (
            ClipDecoder(num_frames, height, width, train=t, seed=seed, max_bad_fraction=f)
            for t, f in ((True, max_bad_fraction), (False, max_bad_fraction))
        )

    def _generated_later(self, split: str) -> bool:
        return bool(self.hparams.generate_digits) and not shard_files(self.data_dir / split)

    def prepare_data(self) -> None:
        """Render the moving-digits shards into every split folder that has none."""
        hp = self.hparams
        if not hp.generate_digits:
            return
        missing = [s for s in ("train", "val") if not shard_files(self.data_dir / s)]
        if missing:
            write_digits_shards(
                self.data_dir,
                num_train=hp.num_train,
                num_val=hp.num_val,
                samples_per_shard=hp.samples_per_shard,
                seed=hp.seed,
                splits=missing,
                overwrite=True,  # only splits without any shard are written
            )

    def _urls(self, split: str) -> list[str]:
        files = shard_files(self.data_dir / split)
        if not files:
            raise FileNotFoundError(
                f"data.data_dir={str(self.data_dir)!r} has no {split} shards "
                f"({self.data_dir / split}/*.tar): run `python scripts/make_shards.py digits "
                f"--out {self.data_dir}` or set data.generate_digits=true"
            )
        frames = (read_manifest(self.data_dir / split) or {}).get("frames")
        if isinstance(frames, int) and frames < self.hparams.num_frames:
            raise ValueError(
                f"data.num_frames={self.hparams.num_frames} but the {split} shards in "
                f"{self.data_dir} hold {frames}-frame videos; lower data.num_frames"
            )
        return [str(f) for f in files]
