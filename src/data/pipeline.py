"""Webdataset stages that turn raw ``.mp4``/``.txt``/``.json`` shard samples into clip batches.

Batch contract (what the LightningModule receives)::

    {"video": FloatTensor (B, 3, T, H, W) in [-1, 1],
     "caption": list[str] (B),
     "meta": list[dict] (B; the sample's json plus "key" and "url")}

Training streams are resampled (infinite, with replacement), split by node and by worker, and
seeded from ``(seed, rank, worker, epoch)`` so every run is reproducible; validation streams read
their shards once, in order. A bad sample or shard is skipped with a warning and counted in
``ClipDecoder.skipped`` (per process: each DataLoader worker keeps its own copy), never fatal;
every decoded sample's ``meta`` carries its stream's running counts (``data_stream``,
``data_seen``, ``data_skipped``) so the trainer can log ``data/skipped`` (callback
``DataHealth``). A stream stops with one clear error only when the bad fraction exceeds
``max_bad_fraction`` (after ``min_samples`` samples) or when it yields nothing but bad samples
for a long time.

Nothing read from a shard is ever unpickled: members are raw bytes decoded explicitly here (no
webdataset default decoders), and a member with a pickle-capable extension (``.pth``, ``.pt``,
``.pyd``, ``.pickle``, ``.pkl``, ``.ckpt``) makes its sample refused and counted as
``unsafe_member`` (:func:`refuse_members`).
"""

from __future__ import annotations

import json
import logging
import math
import random
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
import webdataset as wds

from src.data.video_io import read_mp4

log = logging.getLogger(__name__)

MAX_CONSECUTIVE_SKIPS = 1000
MIN_SAMPLES_FOR_FRACTION = 100  # bad-fraction checks start after this many samples per stream
# extensions whose usual readers (torch.load, pickle, numpy object arrays) can run code
PICKLE_SUFFIXES = frozenset({"pth", "pt", "pyd", "pickle", "pkl", "ckpt"})
VIDEO_MEMBERS = ("mp4", "txt", "json")


class BadSample(Exception):
    """A sample that cannot become a clip; ``reason`` is the counter key."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def refuse_members(sample: dict, allowed: Collection[str] | None = None) -> None:
    """Raise :class:`BadSample` for a pickle-capable member, or one outside ``allowed``.

    ``allowed=None`` accepts every other member (they are ignored, never decoded). The message
    is one line naming the shard, the sample key and the member.
    """
    key, url = sample.get("__key__", "?"), sample.get("__url__", "?")
    for ext in sample:
        if ext.startswith("__"):
            continue
        unsafe = [p for p in ext.split(".") if p in PICKLE_SUFFIXES]
        if unsafe:
            reason, why = "unsafe_member", f"pickle-capable .{unsafe[0]} is never loaded"
        elif allowed is not None and ext not in allowed:
            reason, why = "unexpected_member", "not a member of this shard format"
        else:
            continue
        expected = ", ".join(f".{m}" for m in (allowed or VIDEO_MEMBERS))
        raise BadSample(
            reason,
            f"shard {url}: sample {key}: refused member {key}.{ext} ({why}; expected {expected})",
        )


def _stream_rng(seed: int, stage: int, epoch: int) -> random.Random:
    """An RNG distinct per (seed, stage, rank, worker, epoch); independent of PYTHONHASHSEED."""
    rank, _, worker, _ = wds.utils.pytorch_worker_info()
    entropy = np.random.SeedSequence([seed, stage, rank, worker, epoch]).generate_state(2)
    return random.Random(int(entropy[0]) << 32 | int(entropy[1]))


def to_clip_tensor(frames: np.ndarray, height: int, width: int) -> torch.Tensor:
    """uint8 ``(T, H, W, 3)`` -> float ``(3, T, height, width)`` in [-1, 1].

    A different size is resized so it covers ``height x width`` (bilinear, antialiased, aspect
    kept) and then centre-cropped.
    """
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)  # (T, 3, H, W)
    x = x.float()
    h, w = x.shape[-2:]
    if (h, w) != (height, width):
        scale = max(height / h, width / w)
        size = (max(height, math.ceil(h * scale - 1e-6)), max(width, math.ceil(w * scale - 1e-6)))
        x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
        top, left = (size[0] - height) // 2, (size[1] - width) // 2
        x = x[:, :, top : top + height, left : left + width]  # (T, 3, height, width)
    x = x / 127.5 - 1.0
    return x.clamp_(-1.0, 1.0).permute(1, 0, 2, 3).contiguous()  # (3, T, height, width)


def collate_clips(samples: Sequence[dict]) -> dict:
    """Stack clips into the batch contract; captions and metadata stay lists."""
    return {
        "video": torch.stack([s["video"] for s in samples]),  # (B, 3, T, H, W)
        "caption": [s["caption"] for s in samples],
        "meta": [s["meta"] for s in samples],
    }


def parse_meta(sample: dict) -> dict:
    """The sample's ``.json`` member as a dict; :class:`BadSample` when it is not one."""
    try:
        meta = json.loads(sample["json"])
    except ValueError as exn:
        raise BadSample("bad_json", str(exn)) from exn
    if not isinstance(meta, dict):
        raise BadSample("bad_json", f"expected an object, got {type(meta).__name__}")
    return meta


class SampleDecoder(ABC):
    """Pipeline stage that decodes raw shard samples, skipping and counting bad ones.

    Subclasses implement :meth:`decode` (raise :class:`BadSample` to skip). ``skipped`` counts
    per reason in this process; each epoch (``__call__``) gets its own seeded RNG.
    """

    regenerate_hint = "regenerate them with scripts/make_shards.py"

    def __init__(
        self,
        train: bool,
        seed: int = 0,
        max_bad_fraction: float = 0.25,
        min_samples: int | None = None,
    ):
        if not 0.0 <= max_bad_fraction <= 1.0:
            raise ValueError(
                f"data.max_bad_fraction={max_bad_fraction} must lie in [0, 1]; fix: e.g. 0.25"
            )
        self.train = train
        self.seed = seed
        self.max_bad_fraction = max_bad_fraction
        self.min_samples = MIN_SAMPLES_FOR_FRACTION if min_samples is None else min_samples
        self.skipped: Counter[str] = Counter()
        self.decoded = 0
        self._epoch = -1
        self._consecutive = 0

    def _skip(self, reason: str, key: str, detail: str) -> None:
        self.skipped[reason] += 1
        self._consecutive += 1
        log.warning("skipping sample %s (%s): %s", key, reason, detail)
        bad = sum(self.skipped.values())
        seen = bad + self.decoded
        if seen >= self.min_samples and bad > self.max_bad_fraction * seen:
            raise RuntimeError(
                f"data.max_bad_fraction={self.max_bad_fraction} exceeded: {bad} of {seen} "
                f"samples in this data stream were bad ({dict(self.skipped)}); fix: repair "
                f"the shards ({self.regenerate_hint}) or raise data.max_bad_fraction"
            )
        if self._consecutive >= MAX_CONSECUTIVE_SKIPS:
            raise RuntimeError(
                f"{self._consecutive} bad samples in a row and none usable "
                f"(skipped so far: {dict(self.skipped)}); the shards look corrupt: "
                f"{self.regenerate_hint}"
            )

    def shard_error(self, exn: Exception) -> bool:
        """webdataset handler for unreadable shards/tar members: count, warn, continue."""
        self._skip("shard_error", "-", f"{type(exn).__name__}: {exn}")
        return True

    @abstractmethod
    def decode(self, sample: dict, rng: random.Random | None = None) -> dict:
        """One raw sample (bytes per member) -> a decoded sample; BadSample to skip it."""

    def __call__(self, samples: Iterable[dict]) -> Iterator[dict]:
        """Pipeline stage: decode every sample, skipping (and counting) bad ones."""
        self._epoch += 1
        rng = _stream_rng(self.seed, 1, self._epoch)
        for sample in samples:
            try:
                out = self.decode(sample, rng)
            except BadSample as exn:
                self._skip(exn.reason, sample.get("__key__", "?"), str(exn))
                continue
            self._consecutive = 0
            self.decoded += 1
            if isinstance(out.get("meta"), dict):  # running counts, for data/skipped
                info = torch.utils.data.get_worker_info()
                out["meta"].update(
                    data_stream=f"{'train' if self.train else 'val'}:{info.id if info else 0}",
                    data_seen=self.decoded + sum(self.skipped.values()),
                    data_skipped=sum(self.skipped.values()),
                )
            yield out


class ClipDecoder(SampleDecoder):
    """Decode shard samples into fixed-size clips, skipping and counting bad ones.

    Args:
        num_frames: frames per clip; longer videos are cropped in time (random start when
            ``train``, start 0 otherwise), shorter ones are skipped.
        height: clip height in pixels.
        width: clip width in pixels.
        train: random temporal crops (True) or deterministic ones (False).
        seed: base seed of the temporal-crop RNG.
        max_bad_fraction: stop (one clear error) when more than this share of the stream's
            samples was bad, after ``MIN_SAMPLES_FOR_FRACTION`` samples.
    """

    def __init__(
        self,
        num_frames: int,
        height: int,
        width: int,
        train: bool,
        seed: int = 0,
        max_bad_fraction: float = 0.25,
    ):
        super().__init__(train, seed, max_bad_fraction)
        self.num_frames = num_frames
        self.height = height
        self.width = width

    def decode(self, sample: dict, rng: random.Random | None = None) -> dict:
        """One raw sample (bytes per member) -> ``{"video", "caption", "meta"}``."""
        key = sample.get("__key__", "?")
        refuse_members(sample)  # other unknown members are ignored, never decoded
        if "mp4" not in sample:
            raise BadSample("missing_video", "no .mp4 member")
        text = sample.get("txt")
        caption = text.decode("utf-8", "replace").strip() if isinstance(text, bytes) else ""
        if not caption:
            raise BadSample("missing_caption", "no or empty .txt member")
        meta = parse_meta(sample) if "json" in sample else {}
        meta.update(key=key, url=sample.get("__url__"))
        try:
            frames = read_mp4(sample["mp4"])  # (T, H, W, 3) uint8
        except ValueError as exn:
            raise BadSample("undecodable", str(exn)) from exn
        total = frames.shape[0]
        if total < self.num_frames:
            raise BadSample("too_short", f"{total} frames < num_frames={self.num_frames}")
        start = rng.randint(0, total - self.num_frames) if (self.train and rng) else 0
        frames = frames[start : start + self.num_frames]
        video = to_clip_tensor(frames, self.height, self.width)  # (3, T, H, W)
        expected = (3, self.num_frames, self.height, self.width)
        if tuple(video.shape) != expected:
            raise BadSample("bad_shape", f"clip {tuple(video.shape)} != {expected}")
        meta["frame_start"] = start
        return {"video": video, "caption": caption, "meta": meta}


class EpochShuffle:
    """Sample shuffle buffer whose RNG is seeded per (seed, rank, worker, epoch)."""

    def __init__(self, bufsize: int, seed: int = 0):
        self.bufsize = bufsize
        self.seed = seed
        self._epoch = -1

    def __call__(self, samples: Iterable[dict]) -> Iterator[dict]:
        self._epoch += 1
        if self.bufsize <= 1:
            yield from samples
            return
        rng = _stream_rng(self.seed, 2, self._epoch)
        yield from wds.shuffle(self.bufsize, initial=self.bufsize, rng=rng)(iter(samples))


Batcher = Callable[[Iterable[dict]], Iterator[dict]]


def _batcher(batch_size: int, batcher: Batcher | None) -> Batcher:
    if batcher is not None:
        return batcher
    return wds.batched(batch_size, collation_fn=collate_clips, partial=False)


def train_pipeline(
    urls: Sequence[str],
    decoder: SampleDecoder,
    batch_size: int,
    shuffle_buffer: int,
    seed: int,
    first_epoch: int = 0,
    batcher: Batcher | None = None,
) -> wds.DataPipeline:
    """Infinite, resampled training stream of batches (batched inside the workers).

    Equivalent to ``wds.WebDataset(urls, resampled=True, nodesplitter=wds.split_by_node,
    shardshuffle=False, empty_check=False)`` except that the shard sampler is seeded
    (WebDataset seeds it from the pid and the clock, so runs would not be reproducible). Each
    iteration (epoch) draws new shards, shuffles and crops; ``first_epoch`` lets a resumed run
    continue the sequence instead of replaying epoch 0. ``batcher`` replaces the default
    stage (full ``batch_size`` batches of :func:`collate_clips`), e.g. to bucket by shape.
    """
    shards = wds.ResampledShards(list(urls), seed=seed, deterministic=True, empty_check=False)
    shuffle = EpochShuffle(shuffle_buffer, seed)
    shards.epoch = shuffle._epoch = decoder._epoch = first_epoch - 1  # incremented per __iter__
    return wds.DataPipeline(
        shards,
        wds.split_by_node,
        wds.split_by_worker,
        wds.tarfile_to_samples(handler=decoder.shard_error),
        shuffle,
        decoder,
        _batcher(batch_size, batcher),
    )


def val_pipeline(
    urls: Sequence[str],
    decoder: SampleDecoder,
    batch_size: int | None,
    split_by_node: bool = True,
    batcher: Batcher | None = None,
) -> wds.DataPipeline:
    """Finite validation stream: each shard once, in order, full batches only.

    ``batch_size=None`` yields single samples; ``split_by_node=False`` reads every shard;
    ``batcher`` replaces the default batching stage as in :func:`train_pipeline`.
    """
    batcher = None if batch_size is None else _batcher(batch_size, batcher)
    return wds.DataPipeline(
        wds.SimpleShardList(list(urls)),
        wds.split_by_node if split_by_node else None,
        wds.split_by_worker,
        wds.tarfile_to_samples(handler=decoder.shard_error),
        decoder,
        batcher,
    )
