"""Pre-extract raw autoencoder latents and text features into latent shards.

    python src/extract.py                                    # digits: PCA + MiniLM, bfloat16
    python src/extract.py autoencoder=space_to_depth out_dir=data/latents/digits_s2d
    python src/extract.py data.data_dir=data/shards/myclips data.generate_digits=false \\
        out_dir=data/latents/myclips splits=[train]

Reads every split's video shards once, in order (``data``: a ``WebVideoDataModule`` config; a
folder of videos with a captions CSV/jsonl is first turned into shards with
``python scripts/make_shards.py folder ...``), fits a ``requires_fit`` autoencoder (PCA) on the
first ``autoencoder.fit_samples`` train videos, encodes clips with
``encode_raw(video, sample=sample_posterior)`` and captions with the text encoder, and writes
``<out_dir>/<split>/`` (format: ``src/data/latent_shards.py``). The first ``decode_check`` stored
latents are read back and decoded to ``<out_dir>/decode_check/`` (one mp4 each and
``strip.png``: source and decoded rows in turn) so the shard set can be checked by eye.
Train on the result with ``python src/train.py data=digits_latents``.
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path

import hydra
import numpy as np
import rootutils
import torch
from omegaconf import DictConfig, OmegaConf

rootutils.setup_root(__file__, indicator=".project-root", pythonpath=True)

from src.data.latent_shards import LatentDecoder, check_dtype, write_latent_split  # noqa: E402
from src.data.pipeline import ClipDecoder, val_pipeline  # noqa: E402
from src.data.shards import shard_files  # noqa: E402
from src.data.video_io import write_mp4  # noqa: E402
from src.models.autoencoders import LatentAutoencoder, build_autoencoder  # noqa: E402
from src.models.text_encoders import TextEncoder, build_text_encoder  # noqa: E402
from src.utils import RankedLogger, extras, task_wrapper  # noqa: E402
from src.utils.visualize import save_frame_strip  # noqa: E402

log = RankedLogger(__name__)


def _chunks(items: Iterable, n: int) -> Iterator[list]:
    it = iter(items)
    while chunk := list(islice(it, n)):
        yield chunk


def read_clips(split_dir: Path, data: DictConfig, limit: int | None = None):
    """``(decoder, clips)``: every clip of a video split once, in shard order, uncropped start.

    ``decoder.skipped`` counts the unusable videos once ``clips`` is consumed.
    """
    urls = [str(p) for p in shard_files(split_dir)]
    if not urls:
        raise FileNotFoundError(
            f"{split_dir} has no video shards (*.tar): render them with `python "
            f"scripts/make_shards.py digits --out {split_dir.parent}` (or `... folder`), or "
            "drop the split from `splits`"
        )
    decoder = ClipDecoder(  # extraction records every bad video and never stops on them
        int(data.num_frames), int(data.height), int(data.width), False, 0, max_bad_fraction=1.0
    )
    clips = iter(val_pipeline(urls, decoder, batch_size=None, split_by_node=False))
    return decoder, islice(clips, limit)


def encode_clips(
    ae: LatentAutoencoder,
    te: TextEncoder,
    clips: Iterable[dict],
    batch_size: int,
    sample: bool,
    generator: torch.Generator,
    keep: list[dict],
    num_keep: int,
) -> Iterator[dict]:
    """Clips -> latent-shard samples (raw latents on the CPU); the first ``num_keep`` clips are
    appended to ``keep`` for the decode check."""
    device = next(iter(ae.buffers()), torch.empty(0)).device
    for group in _chunks(clips, batch_size):
        video = torch.stack([c["video"] for c in group]).to(device)  # (B, 3, T, H, W)
        with torch.inference_mode():
            raw = ae.encode_raw(video, sample=sample, generator=generator).float().cpu()
        feats = te.encode([c["caption"] for c in group])
        for i, clip in enumerate(group):
            meta = dict(clip["meta"])
            key, url = meta.pop("key"), meta.pop("url")
            _, frames, height, width = clip["video"].shape
            meta.update(
                source_key=key,
                source_url=url,
                source_frames=meta.get("frames"),
                frames=frames,
                height=height,
                width=width,
                latent_shape=list(raw[i].shape),
            )
            if len(keep) < num_keep:
                keep.append(clip)
            yield {
                "key": key,
                "latent": raw[i],  # (C, t, h, w)
                "tokens": feats.tokens[i],  # (L, D)
                "mask": feats.mask[i],  # (L,)
                "pooled": feats.pooled[i],  # (Dp,)
                "caption": clip["caption"],
                "meta": meta,
            }


def fit_autoencoder(ae: LatentAutoencoder, split_dir: Path, data: DictConfig, n: int) -> None:
    """Fit a ``requires_fit`` autoencoder on the first ``n`` videos of ``split_dir``."""
    device = next(iter(ae.buffers()), torch.empty(0)).device
    _, clips = read_clips(split_dir, data, n)
    batches = (torch.stack([c["video"] for c in g]).to(device) for g in _chunks(clips, 16))
    ae.fit(batches)
    log.info(f"fitted {type(ae).__name__} on the first {n} videos of {split_dir}")


def decode_check(
    ae: LatentAutoencoder, split_dir: Path, manifest: dict, sources: list[dict], out: Path, fps
) -> dict:
    """Decode the first stored latents of a split to mp4s and a strip; PSNR vs the sources."""
    shutil.rmtree(out, ignore_errors=True)
    urls = [str(p) for p in shard_files(split_dir)]
    stored = islice(iter(val_pipeline(urls, LatentDecoder(manifest), None, False)), len(sources))
    by_key = {c["meta"]["key"]: c["video"] for c in sources}
    device = next(iter(ae.buffers()), torch.empty(0)).device
    rows, psnr = [], []
    for sample in stored:
        key = sample["meta"]["key"]
        with torch.inference_mode():
            video = ae.decode_raw(sample["latent"][None].to(device))[0].float().cpu()
        write_mp4(out / f"{key}.mp4", video, fps)
        source = by_key.get(key)
        if source is not None and source.shape == video.shape:
            mse = float((video - source).pow(2).mean())
            psnr.append(10 * math.log10(4.0 / max(mse, 1e-12)))  # peak-to-peak 2 in [-1, 1]
            if not rows or rows[0].shape == video.shape:
                rows += [source, video]
    if rows:
        save_frame_strip(torch.stack(rows), out / "strip.png")
    mean_psnr = round(float(np.mean(psnr)), 2) if psnr else None
    return {"dir": str(out), "videos": len(psnr), "psnr_db": mean_psnr}


@task_wrapper
def extract(cfg: DictConfig) -> dict:
    """Write latent shards for ``cfg.splits``; returns a summary per split."""
    start = time.perf_counter()
    latent_dtype = check_dtype(cfg.latent_dtype)
    text_dtype = check_dtype(cfg.get("text_dtype") or latent_dtype)
    out_dir, data_dir = Path(cfg.out_dir), Path(cfg.data.data_dir)
    splits = list(cfg.splits)
    for split in splits:
        if shard_files(out_dir / split) and not cfg.overwrite:
            raise FileExistsError(
                f"out_dir={str(out_dir)!r} already holds {split} shards: pass overwrite=true "
                "or choose another out_dir"
            )
    ae = build_autoencoder(**cfg.autoencoder).to(cfg.device).eval()
    ae.latent_shape(cfg.data.num_frames, cfg.data.height, cfg.data.width)  # fail fast
    te = build_text_encoder(**cfg.text_encoder)
    hydra.utils.instantiate(cfg.data).prepare_data()  # renders missing digits shards

    state = None
    if ae.requires_fit:  # the fitted state travels with the shards
        if not ae.is_fitted:
            fit_samples = int(cfg.autoencoder.get("fit_samples", 512))
            fit_autoencoder(ae, data_dir / "train", cfg.data, fit_samples)
        state = {k: v.detach().cpu() for k, v in ae.state_dict().items()}
    header = {
        "autoencoder": ae.describe(),
        "autoencoder_config": OmegaConf.to_container(cfg.autoencoder, resolve=True),
        "text_encoder": {
            "config": OmegaConf.to_container(cfg.text_encoder, resolve=True),
            "dim": te.dim,
            "pooled_dim": te.pooled_dim,
            "max_length": te.max_length,
        },
        "source": {
            "data_dir": str(data_dir),
            "data": OmegaConf.to_container(cfg.data, resolve=True),
            "sample_posterior": bool(cfg.sample_posterior),
            "seed": int(cfg.seed),
            "limit": cfg.limit,
        },
    }
    empty = te.empty_features(1)
    null_text = {"tokens": empty.tokens, "mask": empty.mask, "pooled": empty.pooled}

    summary: dict = {}
    sources: list[dict] = []
    for index, split in enumerate(splits):
        t0 = time.perf_counter()
        decoder, clips = read_clips(data_dir / split, cfg.data, cfg.limit)
        seed = int(np.random.SeedSequence([int(cfg.seed), index]).generate_state(1)[0])
        generator = torch.Generator(device=cfg.device).manual_seed(seed)
        num_keep = int(cfg.decode_check) if index == 0 else 0
        batch, posterior = int(cfg.batch_size), bool(cfg.sample_posterior)
        samples = encode_clips(ae, te, clips, batch, posterior, generator, sources, num_keep)
        manifest = write_latent_split(
            out_dir / split,
            samples,
            header,
            null_text,
            latent_dtype=latent_dtype,
            text_dtype=text_dtype,
            samples_per_shard=int(cfg.samples_per_shard),
            name=out_dir.name,
            skipped=decoder.skipped,
            autoencoder_state=state,
            overwrite=bool(cfg.overwrite),
        )
        size = sum(p.stat().st_size for p in shard_files(out_dir / split))
        summary[split] = {
            "samples": manifest["num_samples"],
            "skipped": manifest["skipped"],
            "shards": manifest["num_shards"],
            "shapes": manifest["shapes"],
            "bytes": size,
            "seconds": round(time.perf_counter() - t0, 2),
            "dir": str(out_dir / split),
        }
        log.info(
            f"{split}: {manifest['num_samples']} samples {manifest['shapes']} in "
            f"{manifest['num_shards']} shards, {size / 2**20:.2f} MiB, skipped "
            f"{manifest['skipped'] or 'none'}, {summary[split]['seconds']} s -> {out_dir / split}"
        )
        if index == 0 and sources:
            fps = sources[0]["meta"].get("fps") or cfg.video.fps
            check_dir = out_dir / "decode_check"
            check = decode_check(ae, out_dir / split, manifest, sources, check_dir, fps)
            summary["decode_check"] = check
            log.info(
                f"decode check: {check['videos']} videos, PSNR {check['psnr_db']} dB -> "
                f"{check_dir}"
            )
    summary["seconds"] = round(time.perf_counter() - start, 2)
    log.info(f"extracted {splits} in {summary['seconds']} s; train with data=digits_latents")
    return summary


@hydra.main(version_base="1.3", config_path="../configs", config_name="extract.yaml")
def main(cfg: DictConfig) -> None:
    extras(cfg)
    extract(cfg)


if __name__ == "__main__":
    main()
