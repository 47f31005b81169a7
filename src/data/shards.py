"""Write webdataset tar shards of ``.mp4`` + ``.txt`` + ``.json`` samples.

Layout: ``<out>/<split>/<name>-<split>-%06d.tar`` plus ``<out>/<split>/manifest.json``.
Sample keys are ``<name>_<index:06d>`` (no dots: webdataset splits keys at the first dot).

Two sources share one writer: the moving-digits world (:func:`write_digits_shards`) and a
folder of real videos with a captions table (:func:`write_folder_shards`). A split is written
into a hidden ``.<split>.partial`` folder and moved into place only when complete, and
``manifest.json`` is written last, so an interrupted run never leaves a half-written split
that looks finished.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import shutil
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import webdataset as wds

from src.data import digits as dg
from src.data.video_io import DEFAULT_CRF, mp4_bytes, read_video

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
VIDEO_SUFFIXES = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v", ".gif")


def drop_empty_shard(folder: Path) -> None:
    """ShardWriter opens its first shard eagerly: remove it when nothing was written."""
    for path in folder.glob("*.tar"):
        path.unlink()


def shard_files(split_dir: str | os.PathLike) -> list[Path]:
    """The ``*.tar`` shards of one split folder, sorted by name (empty if none)."""
    split_dir = Path(split_dir)
    return sorted(split_dir.glob("*.tar")) if split_dir.is_dir() else []


def read_manifest(split_dir: str | os.PathLike) -> dict | None:
    """The split's manifest, or ``None`` when it has none (not written, or interrupted)."""
    path = Path(split_dir) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", name)


def _uniform(values: list) -> object:
    """The value shared by all samples, or None when they differ (or there are none)."""
    distinct = {json.dumps(v) for v in values}
    return values[0] if len(distinct) == 1 else None


def write_split(
    out_dir: str | os.PathLike,
    split: str,
    samples: Iterable[dict],
    samples_per_shard: int,
    name: str,
    manifest_extra: dict,
    overwrite: bool = False,
) -> dict:
    """Write ``samples`` (``{"mp4": bytes, "txt": str, "json": dict}``) as one split's shards.

    Returns the manifest (also written to ``<out>/<split>/manifest.json``).
    """
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    name = _safe_name(name)
    final = Path(out_dir) / split
    if shard_files(final) and not overwrite:
        raise FileExistsError(
            f"{final} already holds shards; delete it or pass overwrite=True (--overwrite)"
        )
    tmp = Path(out_dir) / f".{split}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    pattern = str(tmp / f"{name}-{split}-%06d.tar")
    fps, frames, sizes = [], [], []
    writer = wds.ShardWriter(pattern, maxcount=samples_per_shard, maxsize=float("inf"), verbose=0)
    num = 0
    try:
        for sample in samples:
            meta = sample["json"]
            writer.write(
                {
                    "__key__": f"{name}_{num:06d}",
                    "mp4": sample["mp4"],
                    "txt": sample["txt"],
                    "json": meta,
                }
            )
            fps.append(meta.get("fps"))
            frames.append(meta.get("frames"))
            sizes.append(meta.get("size"))
            num += 1
    finally:
        writer.close()
    if num == 0:
        drop_empty_shard(tmp)

    final.mkdir(parents=True, exist_ok=True)
    if overwrite:
        for path in [*shard_files(final), final / MANIFEST]:
            path.unlink(missing_ok=True)
    written = sorted(tmp.glob("*.tar"))
    for path in written:
        os.replace(path, final / path.name)
    tmp.rmdir()

    counts = [min(samples_per_shard, num - i * samples_per_shard) for i in range(len(written))]
    manifest = {
        "name": name,
        "split": split,
        "num_samples": num,
        "num_shards": len(written),
        "samples_per_shard": samples_per_shard,
        "shards": [{"file": p.name, "num_samples": c} for p, c in zip(written, counts)],
        "fps": _uniform(fps),
        "frames": _uniform(frames),
        "size": _uniform(sizes),
        "members": ["mp4", "txt", "json"],
        **manifest_extra,
    }
    part = final / f".{MANIFEST}.partial"
    part.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(part, final / MANIFEST)
    log.info("wrote %d samples in %d shards to %s", num, len(written), final)
    return manifest


def _digit_samples(
    num: int,
    split: str,
    seed: int,
    canvas_size: int,
    scale: int,
    speed: int,
    num_frames: int,
    fps: int,
    canonical_fraction: float,
    crf: int,
) -> Iterable[dict]:
    specs = dg.iter_specs(num, split, seed, canvas_size, scale, speed, num_frames)
    for i, spec in enumerate(specs):
        video = dg.render_video(spec, canvas_size, scale, speed, num_frames)
        rng = np.random.default_rng([seed, dg.SPLITS.index(split), i, 1])
        caption = dg.random_caption(
            spec.digit, spec.color, spec.direction, rng, canonical_fraction
        )
        meta = {
            "source": "digits",
            "digit": spec.digit,
            "color": spec.color,
            "direction": spec.direction,
            "glyph_id": spec.glyph_id,
            "start_xy": list(spec.start_xy),
            "canonical_caption": dg.canonical_caption(spec.digit, spec.color, spec.direction),
            "fps": fps,
            "frames": num_frames,
            "size": [canvas_size, canvas_size],
        }
        yield {"mp4": mp4_bytes(video, fps, crf), "txt": caption, "json": meta}


def write_digits_shards(
    out_dir: str | os.PathLike,
    num_train: int = 4000,
    num_val: int = 256,
    samples_per_shard: int = 250,
    seed: int = 0,
    name: str = "digits",
    splits: Sequence[str] = dg.SPLITS,
    canvas_size: int = dg.CANVAS_SIZE,
    scale: int = dg.SCALE,
    speed: int = dg.SPEED,
    num_frames: int = dg.NUM_FRAMES,
    fps: int = dg.FPS,
    canonical_fraction: float = 0.5,
    crf: int = DEFAULT_CRF,
    overwrite: bool = False,
) -> dict[str, dict]:
    """Render the moving-digits dataset into ``<out_dir>/{train,val}`` shards.

    Each split draws glyphs only from its own glyph ids, so validation handwriting is never
    seen in training. ``splits`` selects which splits to (re)write; each split is deterministic
    in ``seed`` on its own. Returns ``{split: manifest}``.
    """
    dg.start_ranges("right", canvas_size, scale, speed, num_frames)  # fail fast if it can't fit
    sizes = {"train": num_train, "val": num_val}
    generator = {
        "seed": seed,
        "canvas_size": canvas_size,
        "scale": scale,
        "speed": speed,
        "num_frames": num_frames,
        "fps": fps,
        "colors": list(dg.COLORS),
        "directions": list(dg.DIRECTIONS),
        "val_fraction": dg.VAL_FRACTION,
        "glyph_split_seed": dg.GLYPH_SPLIT_SEED,
        "canonical_fraction": canonical_fraction,
        "codec": "h264",
        "pix_fmt": "yuv420p",
        "crf": crf,
    }
    manifests = {}
    for split in splits:
        samples = _digit_samples(
            num=sizes[split],
            split=split,
            seed=seed,
            canvas_size=canvas_size,
            scale=scale,
            speed=speed,
            num_frames=num_frames,
            fps=fps,
            canonical_fraction=canonical_fraction,
            crf=crf,
        )
        extra = {"source": "digits", "generator": generator, "skipped": {}}
        manifests[split] = write_split(
            out_dir, split, samples, samples_per_shard, name, extra, overwrite
        )
    return manifests


def read_caption_table(path: str | os.PathLike) -> list[tuple[str, str]]:
    """Read ``(video path, caption)`` rows from a CSV (``path,caption``) or a jsonl file.

    jsonl lines may name the video ``path`` or ``video`` and the caption ``caption`` or
    ``text``. A row without a caption keeps an empty caption (counted as skipped later).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"captions file not found: {path}")
    rows: list[tuple[str, str]] = []
    if path.suffix.lower() == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = {"path", "caption"} - set(reader.fieldnames or [])
            if missing:
                raise ValueError(
                    f"{path}: CSV needs columns path,caption; missing {sorted(missing)}"
                )
            rows = [(r["path"] or "", (r["caption"] or "").strip()) for r in reader]
    elif path.suffix.lower() in (".jsonl", ".ndjson"):
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exn:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({exn.msg})") from exn
            video = rec.get("path", rec.get("video"))
            if video is None:
                raise ValueError(f"{path}:{lineno}: needs a 'path' or 'video' field")
            caption = rec.get("caption", rec.get("text")) or ""
            rows.append((str(video), str(caption).strip()))
    else:
        raise ValueError(f"{path}: captions must be a .csv (path,caption) or .jsonl file")
    return rows


def _folder_samples(
    rows: list[tuple[str, str]],
    videos_dir: Path,
    skipped: Counter,
    reencode: bool,
    default_fps: float,
    crf: int,
) -> Iterable[dict]:
    for rel, caption in rows:
        path = Path(rel) if Path(rel).is_absolute() else videos_dir / rel
        if not caption:
            skipped["no_caption"] += 1
            log.warning("skipping %s: empty caption", path)
            continue
        if not path.is_file():
            skipped["missing"] += 1
            log.warning("skipping %s: file not found", path)
            continue
        try:
            frames, fps = read_video(path)
        except ValueError as exn:
            skipped["undecodable"] += 1
            log.warning("skipping %s: %s", path, exn)
            continue
        fps = fps or default_fps
        if reencode or path.suffix.lower() != ".mp4":
            t, h, w, _ = frames.shape
            frames = frames[:, : h - h % 2, : w - w % 2]  # yuv420p needs even sizes
            if frames.shape[1] == 0 or frames.shape[2] == 0:
                skipped["undecodable"] += 1
                log.warning("skipping %s: frame size %dx%d too small", path, h, w)
                continue
            data = mp4_bytes(frames, fps, crf)
        else:
            data = path.read_bytes()
        t, h, w, _ = frames.shape
        meta = {"source": "folder", "path": rel, "fps": fps, "frames": t, "size": [h, w]}
        yield {"mp4": data, "txt": caption, "json": meta}


def write_folder_shards(
    out_dir: str | os.PathLike,
    videos_dir: str | os.PathLike,
    captions_file: str | os.PathLike,
    samples_per_shard: int = 250,
    name: str = "videos",
    split: str = "train",
    val_fraction: float = 0.0,
    seed: int = 0,
    reencode: bool = False,
    default_fps: float = 8.0,
    crf: int = DEFAULT_CRF,
    overwrite: bool = False,
) -> dict:
    """Turn a folder of videos plus a captions table into shards.

    Paths in the table are relative to ``videos_dir`` (or absolute). Decodable ``.mp4`` files
    are copied as they are (``reencode`` forces H.264 re-encoding); other containers are
    re-encoded. A missing, undecodable or uncaptioned video is skipped and counted, never fatal.
    With ``val_fraction > 0`` a deterministic (``seed``) share of rows goes to ``val`` and the
    rest to ``train``; otherwise every row goes to ``split``.

    Returns ``{"manifests": {split: manifest}, "skipped": {reason: count}}``.
    """
    videos_dir = Path(videos_dir)
    if not videos_dir.is_dir():
        raise FileNotFoundError(f"videos folder not found: {videos_dir}")
    rows = read_caption_table(captions_file)
    if val_fraction > 0:
        order = np.random.default_rng(seed).permutation(len(rows))
        num_val = max(1, round(len(rows) * val_fraction))
        groups = {
            "train": [rows[i] for i in sorted(order[num_val:])],
            "val": [rows[i] for i in sorted(order[:num_val])],
        }
    else:
        groups = {split: rows}
    generator = {
        "videos_dir": str(videos_dir),
        "captions_file": str(captions_file),
        "val_fraction": val_fraction,
        "seed": seed,
        "reencode": reencode,
        "crf": crf,
    }
    manifests, total = {}, Counter()
    for group, group_rows in groups.items():
        skipped: Counter = Counter()
        samples = _folder_samples(group_rows, videos_dir, skipped, reencode, default_fps, crf)
        # the manifest is written after the samples are consumed, so `skipped` is final there
        extra = {"source": "folder", "generator": generator, "skipped": skipped}
        manifests[group] = write_split(
            out_dir, group, samples, samples_per_shard, name, extra, overwrite
        )
        total += skipped
    if total:
        log.warning("skipped %d of %d videos: %s", sum(total.values()), len(rows), dict(total))
    return {"manifests": manifests, "skipped": dict(total)}
