"""Data layer: moving-digits renderer, mp4 I/O, shard writers and the webdataset DataModule."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from src.data import digits as dg
from src.data import pipeline as pl
from src.data.shards import read_manifest, shard_files, write_digits_shards, write_folder_shards
from src.data.video_io import mp4_bytes, read_mp4, read_video, write_mp4
from src.data.webvideo_datamodule import WebVideoDataModule

ROOT = Path(__file__).resolve().parents[1]
NUM_TRAIN, NUM_VAL, PER_SHARD = 32, 16, 8


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory) -> Path:
    """4 train shards and 2 val shards of 8 moving-digit videos each (read-only for tests)."""
    root = tmp_path_factory.mktemp("digits")
    write_digits_shards(root, NUM_TRAIN, NUM_VAL, PER_SHARD, seed=0)
    return root


def make_dm(data_dir, **kw) -> WebVideoDataModule:
    args = dict(batch_size=4, shuffle_buffer=16, batches_per_epoch=3, val_batches=2, seed=0)
    args.update(kw)
    return WebVideoDataModule(str(data_dir), **args)


def keys(batches) -> list[str]:
    return [m["key"] for b in batches for m in b["meta"]]


def read_tar(path) -> dict[str, dict[str, bytes]]:
    """{key: {ext: bytes}} of a shard, in file order."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def centroid(frame: np.ndarray) -> np.ndarray:
    """(x, y) centroid of the pixel intensity of an (H, W, 3) frame."""
    weight = frame.astype(np.float64).sum(-1)  # (H, W)
    ys, xs = np.indices(weight.shape)
    return np.array([(xs * weight).sum(), (ys * weight).sum()]) / weight.sum()


# ---------------------------------------------------------------- renderer


@pytest.mark.parametrize(
    "settings",
    [
        dict(),  # the defaults: 64px canvas, x3, 2 px/frame, 17 frames
        dict(canvas_size=48, scale=2, speed=1, num_frames=9),
    ],
)
def test_digit_stays_inside_and_moves_at_speed(settings):
    speed = settings.get("speed", dg.SPEED)
    size = 8 * settings.get("scale", dg.SCALE)
    canvas = settings.get("canvas_size", dg.CANVAS_SIZE)
    frames = settings.get("num_frames", dg.NUM_FRAMES)
    for split in dg.SPLITS:
        for spec in dg.iter_specs(24, split, seed=3, **settings):
            video = dg.render_video(spec, **settings)
            assert video.shape == (frames, canvas, canvas, 3) and video.dtype == np.uint8
            mass = video.reshape(frames, -1).astype(np.int64).sum(1)
            assert (mass == mass[0]).all() and mass[0] > 0  # nothing clipped at any frame
            dx, dy = dg.DIRECTIONS[spec.direction]
            for t in range(frames):
                x, y = spec.start_xy[0] + dx * speed * t, spec.start_xy[1] + dy * speed * t
                assert 0 <= x <= canvas - size and 0 <= y <= canvas - size
                outside = video[t].copy()
                outside[y : y + size, x : x + size] = 0
                assert not outside.any()  # all ink lies in the glyph box
            steps = np.diff(np.stack([centroid(f) for f in video]), axis=0)  # (T-1, 2)
            np.testing.assert_allclose(steps, np.tile([dx * speed, dy * speed], (frames - 1, 1)))


def test_extreme_starts_fit_and_bad_starts_raise():
    for direction in dg.DIRECTIONS:
        xs, ys = dg.start_ranges(direction)
        for x in (xs[0], xs[-1]):
            for y in (ys[0], ys[-1]):
                dg.render_video(dg.DigitSpec(1, "red", direction, 1, (x, y)))
        with pytest.raises(ValueError, match="leaves the 64px canvas"):
            dg.render_video(dg.DigitSpec(1, "red", direction, 1, (xs[-1] + 1, ys[-1] + 1)))
    with pytest.raises(ValueError, match="does not fit"):
        dg.start_ranges("left", canvas_size=32)


@pytest.mark.parametrize("color", list(dg.COLORS))
def test_colour_matches_tint(color):
    spec = dg.make_spec(glyph_id=11, color=color, direction="up", seed=0)
    video = dg.render_video(spec)
    tint = np.array(dg.COLORS[color])
    ink = video.max(-1) > 0  # (T, H, W)
    pixels = video[ink].astype(np.int64)  # (N, 3)
    assert (pixels[:, tint == 0] == 0).all()
    on = pixels[:, tint == 255]
    assert (on == on[:, :1]).all()  # equal in every tinted channel
    intensity = dg.glyph_image(spec.glyph_id).max()
    assert (pixels.max(0) == np.round(intensity * tint)).all()


def test_render_is_deterministic():
    a = dg.make_spec(100, "cyan", "down", seed=5)
    assert a == dg.make_spec(100, "cyan", "down", seed=5)
    assert a.digit == dg.glyph_digit(100)
    np.testing.assert_array_equal(dg.render_video(a), dg.render_video(a))
    starts = {dg.make_spec(100, "cyan", "down", seed=s).start_xy for s in range(20)}
    assert len(starts) > 1  # the seed does move the start
    assert list(dg.iter_specs(10, "train", 1)) == list(dg.iter_specs(10, "train", 1))
    assert list(dg.iter_specs(10, "train", 1)) != list(dg.iter_specs(10, "train", 2))


def test_captions_canonical_and_round_trip():
    assert dg.canonical_caption(7, "red", "left") == "a red digit 7 moving left"
    pattern = re.compile(r"a (\w+) digit (\d) moving (left|right|up|down)")
    for digit in range(10):
        for color in dg.COLORS:
            for direction in dg.DIRECTIONS:
                variants = dg.caption_variants(digit, color, direction)
                assert len(set(variants)) == len(variants) >= 4
                match = pattern.fullmatch(variants[0])
                assert match and match.groups() == (color, str(digit), direction)
                for text in variants:
                    assert dg.parse_caption(text) == (digit, color, direction), text
                assert dg.parse_caption(text.upper()) == (digit, color, direction)
    assert "seven" in dg.caption_variants(7, "red", "left")[1]
    assert dg.parse_caption("a red seven drifting to the left") == (7, "red", "left")
    assert dg.parse_caption("a red blue digit 3 moving left") is None  # two colours
    assert dg.parse_caption("a red digit moving left") is None  # no digit
    assert dg.parse_caption("a cat playing piano") is None


def test_random_caption_mixes_phrasings():
    rng = np.random.default_rng(0)
    texts = [dg.random_caption(4, "green", "right", rng) for _ in range(200)]
    canonical = dg.canonical_caption(4, "green", "right")
    assert 0.35 < texts.count(canonical) / len(texts) < 0.65
    assert set(texts) == set(dg.caption_variants(4, "green", "right"))


def test_glyph_split_is_disjoint_and_stratified():
    train, val = dg.split_glyph_ids("train"), dg.split_glyph_ids("val")
    assert not set(train) & set(val)
    assert len(train) + len(val) == dg.num_glyphs() == 1797
    assert 0.08 < len(val) / 1797 < 0.12
    assert {dg.glyph_digit(g) for g in val} == set(range(10))
    assert {s.glyph_id for s in dg.iter_specs(200, "val", 0)} <= set(val)
    assert {s.glyph_id for s in dg.iter_specs(200, "train", 0)} <= set(train)


# ---------------------------------------------------------------- mp4 I/O


def test_mp4_round_trip_is_faithful(tmp_path):
    # measured at crf 12 over 300 videos: whole-frame MAE <= 2.0 (mean 0.8); white glyph
    # pixels <= 1.0; saturated glyph pixels ~10 (4:2:0 chroma bleed), colour still recognisable
    names = list(dg.COLORS)
    tints = np.array([dg.COLORS[c] for c in names], dtype=np.float64)
    tints /= np.linalg.norm(tints, axis=1, keepdims=True)
    for i, color in enumerate(names):
        for direction in dg.DIRECTIONS:
            video = dg.render_video(dg.make_spec(37 * i + 5, color, direction, seed=i))
            decoded = read_mp4(mp4_bytes(video, fps=8))
            assert decoded.shape == video.shape and decoded.dtype == np.uint8
            err = np.abs(decoded.astype(np.int64) - video.astype(np.int64))
            assert err.mean() < 2.5
            ink = video.max(-1) > 0
            if color == "white":
                assert err[ink].mean() < 1.5
            mean_rgb = decoded[ink].mean(0)
            assert names[int(np.argmax(tints @ mean_rgb))] == color

    # float (3, T, H, W) in [-1, 1] via a file path, and its fps
    tensor = torch.from_numpy(video).permute(3, 0, 1, 2).float() / 127.5 - 1
    path = write_mp4(tmp_path / "sub" / "clip.mp4", tensor, fps=8)
    frames, fps = read_video(path)
    assert fps == 8
    assert np.abs(frames.astype(np.int64) - video.astype(np.int64)).mean() < 2.5


def test_mp4_bad_input_gives_clear_errors(tmp_path):
    good = mp4_bytes(np.zeros((3, 16, 16, 3), np.uint8), fps=8)
    with pytest.raises(ValueError, match="empty"):
        read_mp4(b"")
    for bad in (os.urandom(600), good[: len(good) // 2]):
        with pytest.raises(ValueError, match="cannot decode video"):
            read_mp4(bad)
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        read_mp4(tmp_path / "empty.mp4")
    with pytest.raises(FileNotFoundError):
        read_mp4(tmp_path / "nope.mp4")
    with pytest.raises(ValueError, match="even"):
        mp4_bytes(np.zeros((3, 15, 16, 3), np.uint8), fps=8)
    with pytest.raises(ValueError, match="uint8"):
        mp4_bytes(np.zeros((3, 16, 16, 3), np.float32), fps=8)


# ---------------------------------------------------------------- shards


def test_digits_shards_and_manifest(digits_root):
    for split, num in (("train", NUM_TRAIN), ("val", NUM_VAL)):
        files = shard_files(digits_root / split)
        assert [f.name for f in files] == [
            f"digits-{split}-{i:06d}.tar" for i in range(num // PER_SHARD)
        ]
        manifest = read_manifest(digits_root / split)
        assert manifest["num_samples"] == num and manifest["num_shards"] == len(files)
        assert [s["num_samples"] for s in manifest["shards"]] == [PER_SHARD] * len(files)
        assert (manifest["fps"], manifest["frames"], manifest["size"]) == (8, 17, [64, 64])
        assert manifest["generator"]["speed"] == 2 and manifest["generator"]["seed"] == 0
        seen = 0
        for f in files:
            for key, members in read_tar(f).items():
                assert "." not in key and re.fullmatch(r"digits_\d{6}", key)
                assert set(members) == {"mp4", "txt", "json"}
                meta = json.loads(members["json"])
                assert {"digit", "color", "direction", "glyph_id", "start_xy", "fps"} <= set(meta)
                assert (meta["frames"], meta["size"], meta["source"]) == (17, [64, 64], "digits")
                facts = (meta["digit"], meta["color"], meta["direction"])
                assert dg.parse_caption(members["txt"].decode()) == facts
                assert meta["glyph_id"] in dg.split_glyph_ids(split)
                spec = dg.DigitSpec(*facts, meta["glyph_id"], tuple(meta["start_xy"]))
                rendered = dg.render_video(spec).astype(np.int64)
                assert np.abs(read_mp4(members["mp4"]) - rendered).mean() < 2.5
                seen += 1
        assert seen == num
    with pytest.raises(FileExistsError, match="overwrite"):
        write_digits_shards(digits_root, 8, 8, 8, seed=0)


def _caption_rows(tmp_path: Path) -> tuple[Path, list[tuple[str, str]]]:
    videos = tmp_path / "videos"
    videos.mkdir()
    clip = dg.render_video(dg.make_spec(3, "blue", "left", seed=0))
    write_mp4(videos / "a.mp4", clip, fps=8)
    # an mp4 stream under another container name: taken through the re-encode path
    (videos / "b.mov").write_bytes(mp4_bytes(np.concatenate([clip, clip])[:, 8:56], fps=10))
    (videos / "broken.mp4").write_bytes(os.urandom(800))
    rows = [
        ("a.mp4", "a blue digit 3 moving left"),
        ("b.mov", "a longer cropped clip"),
        ("missing.mp4", "never written"),
        ("broken.mp4", "garbage bytes"),
        ("a.mp4", ""),
    ]
    return videos, rows


def test_folder_shards_from_csv(tmp_path, caplog):
    videos, rows = _caption_rows(tmp_path)
    table = tmp_path / "captions.csv"
    lines = ["path,caption"] + [f'{p},"{c}"' for p, c in rows]
    table.write_text("\n".join(lines) + "\n")
    with caplog.at_level(logging.WARNING):
        result = write_folder_shards(tmp_path / "out", videos, table, samples_per_shard=1)
    assert result["skipped"] == {"missing": 1, "undecodable": 1, "no_caption": 1}
    assert "missing.mp4" in caplog.text and "broken.mp4" in caplog.text
    manifest = read_manifest(tmp_path / "out" / "train")
    assert manifest["num_samples"] == 2 and manifest["num_shards"] == 2
    assert manifest["skipped"] == result["skipped"]
    assert manifest["frames"] is None and manifest["size"] is None  # the two videos differ
    samples = [s for f in shard_files(tmp_path / "out" / "train") for s in read_tar(f).values()]
    metas = [json.loads(s["json"]) for s in samples]
    assert [m["path"] for m in metas] == ["a.mp4", "b.mov"]
    assert [s["txt"].decode() for s in samples] == [rows[0][1], rows[1][1]]
    assert samples[0]["mp4"] == (videos / "a.mp4").read_bytes()  # mp4 copied as is
    reencoded, fps = read_video(samples[1]["mp4"])
    assert reencoded.shape == (34, 48, 64, 3) and fps == 10
    assert (metas[1]["frames"], metas[1]["size"], metas[1]["fps"]) == (34, [48, 64], 10)


def test_folder_shards_from_jsonl_feed_the_datamodule(tmp_path):
    videos, rows = _caption_rows(tmp_path)
    rows = rows[:2] * 4  # 8 good rows
    table = tmp_path / "captions.jsonl"
    table.write_text("".join(json.dumps({"video": p, "text": c}) + "\n" for p, c in rows))
    out = tmp_path / "out"
    result = write_folder_shards(out, videos, table, samples_per_shard=2, val_fraction=0.25)
    assert result["skipped"] == {}
    assert {s: m["num_samples"] for s, m in result["manifests"].items()} == {"train": 6, "val": 2}
    dm = make_dm(out, batch_size=2, num_frames=8, height=32, width=32, val_batches=1)
    dm.setup("fit")
    for batch in [*dm.train_dataloader(), *dm.val_dataloader()]:
        assert batch["video"].shape == (2, 3, 8, 32, 32)
        assert set(batch["caption"]) <= {c for _, c in rows}


def test_make_shards_cli(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("make_shards", ROOT / "scripts/make_shards.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    argv = ["digits", "--out", str(tmp_path), "--num-train", "4", "--num-val", "2"]
    assert cli.main([*argv, "--samples-per-shard", "2"]) == 0
    assert read_manifest(tmp_path / "train")["num_shards"] == 2
    assert cli.main(argv) == 2  # refuses to overwrite
    assert "--overwrite" in capsys.readouterr().err


# ---------------------------------------------------------------- datamodule


def test_datamodule_batches(digits_root):
    dm = make_dm(digits_root)
    dm.prepare_data()  # generate_digits is off: must not touch anything
    dm.setup("fit")
    loader = dm.train_dataloader()
    epochs = [list(loader) for _ in range(2)]
    for batches in epochs:
        assert len(batches) == 3  # with_epoch honoured, every epoch
        for batch in batches:
            video = batch["video"]
            assert video.shape == (4, 3, 17, 64, 64) and video.dtype == torch.float32
            assert video.min() >= -1 and video.max() <= 1 and video.min() < -0.99
            assert len(batch["caption"]) == 4 and all(isinstance(c, str) for c in batch["caption"])
            for caption, meta in zip(batch["caption"], batch["meta"]):
                facts = (meta["digit"], meta["color"], meta["direction"])
                assert dg.parse_caption(caption) == facts
    assert keys(epochs[0]) != keys(epochs[1])  # a new epoch draws a new stream

    val = [list(dm.val_dataloader()) for _ in range(2)]
    assert len(val[0]) == 2 and keys(val[0]) == keys(val[1])  # deterministic
    assert keys(val[0]) == [f"digits_{i:06d}" for i in range(8)]
    assert all(m["frame_start"] == 0 for b in val[0] for m in b["meta"])

    fixed = dm.fixed_val_batch(5)
    assert fixed["video"].shape == (5, 3, 17, 64, 64)
    assert [m["key"] for m in fixed["meta"]] == keys(val[0])[:5]
    assert torch.equal(fixed["video"], dm.fixed_val_batch(5)["video"])
    assert torch.equal(fixed["video"][:4], val[0][0]["video"])
    assert dm.skipped == {"train": {}, "val": {}}


def test_datamodule_crops_and_resizes(digits_root):
    dm = make_dm(digits_root, num_frames=9, height=32, width=48, batches_per_epoch=4)
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert all(b["video"].shape == (4, 3, 9, 32, 48) for b in batches)
    starts = {m["frame_start"] for b in batches for m in b["meta"]}
    assert starts <= set(range(9)) and len(starts) > 1  # random temporal crops in training
    assert {m["frame_start"] for b in dm.val_dataloader() for m in b["meta"]} == {0}
    with pytest.raises(ValueError, match="data.num_frames=20"):
        make_dm(digits_root, num_frames=20).setup("fit")
    with pytest.raises(ValueError, match="data.batch_size=20"):
        make_dm(digits_root, batch_size=20).setup("fit")  # 16 val clips < one batch


def test_training_stream_is_seeded(digits_root):
    def first_keys(seed):
        dm = make_dm(digits_root, seed=seed)
        dm.setup("fit")
        return keys(dm.train_dataloader())

    assert first_keys(0) == first_keys(0)
    assert first_keys(0) != first_keys(1)


def test_prepare_data_generates_digits_once(tmp_path):
    dm = make_dm(
        tmp_path / "gen", generate_digits=True, num_train=8, num_val=8, samples_per_shard=4
    )
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.train_urls) == 2 and len(dm.val_urls) == 2
    stamp = [os.stat(u).st_mtime_ns for u in dm.train_urls]
    dm.prepare_data()
    assert [os.stat(u).st_mtime_ns for u in dm.train_urls] == stamp
    assert next(iter(dm.train_dataloader()))["video"].shape == (4, 3, 17, 64, 64)


@pytest.mark.parametrize("make_split_dirs", [False, True])
def test_missing_shards_fail_fast_with_one_clear_line(tmp_path, make_split_dirs):
    root = tmp_path / "nothing"
    if make_split_dirs:
        (root / "train").mkdir(parents=True)
        (root / "val").mkdir()
    dm = make_dm(root, generate_digits=False)
    dm.prepare_data()
    with pytest.raises(FileNotFoundError) as info:
        dm.setup("fit")
    message = str(info.value)
    assert "\n" not in message
    assert f"data.data_dir={str(root)!r}" in message
    assert "data.generate_digits=true" in message and "make_shards.py" in message


def _write_shard(path: Path, samples: list[dict]) -> None:
    with wds.TarWriter(str(path)) as sink:
        for sample in samples:
            sink.write(sample)


def _good_samples(digits_root, n) -> list[dict]:
    raw = read_tar(shard_files(digits_root / "train")[0])
    return [{"__key__": k, **v} for k, v in list(raw.items())[:n]]


def test_corrupt_samples_are_skipped_and_counted(digits_root, tmp_path, caplog):
    good = _good_samples(digits_root, 6)
    mp4 = good[0]["mp4"]
    bad = [
        {**good[0], "__key__": "bad_garbage", "mp4": os.urandom(700)},
        {**good[0], "__key__": "bad_truncated", "mp4": mp4[: len(mp4) // 2]},
        {k: v for k, v in {**good[1], "__key__": "bad_nocaption"}.items() if k != "txt"},
    ]
    for split in ("train", "val"):
        (tmp_path / split).mkdir()
        _write_shard(tmp_path / split / "x-000000.tar", good[:3] + bad + good[3:])
    # a shard cut off in the middle of its second member
    whole = (tmp_path / "val" / "x-000000.tar").read_bytes()
    (tmp_path / "val" / "x-000001.tar").write_bytes(whole[:3000])

    dm = make_dm(tmp_path, batch_size=2, shuffle_buffer=4, batches_per_epoch=6)
    dm.setup("fit")
    with caplog.at_level(logging.WARNING):
        batches = list(dm.train_dataloader())
    assert len(batches) == 6  # data still flows
    assert all(b["video"].shape == (2, 3, 17, 64, 64) for b in batches)
    assert not any(k.startswith("bad_") for k in keys(batches))
    skipped = dm.skipped["train"]
    assert skipped["undecodable"] >= 2 and skipped["missing_caption"] >= 1
    assert "bad_garbage" in caplog.text

    decoder = pl.ClipDecoder(17, 64, 64, train=False)
    clips = list(pl.val_pipeline(dm.val_urls, decoder, batch_size=None))
    # 6 good clips from the whole shard, plus what precedes the cut in the truncated one
    assert [c["meta"]["key"] for c in clips][:6] == [s["__key__"] for s in good]
    assert decoder.skipped["undecodable"] == 2 and decoder.skipped["missing_caption"] == 1
    assert decoder.skipped["shard_error"] == 1


def test_only_corrupt_samples_raise_instead_of_hanging(tmp_path, monkeypatch):
    monkeypatch.setattr(pl, "MAX_CONSECUTIVE_SKIPS", 5)
    junk = [{"__key__": f"j{i}", "mp4": os.urandom(300), "txt": b"x"} for i in range(3)]
    _write_shard(tmp_path / "junk.tar", junk)
    decoder = pl.ClipDecoder(17, 64, 64, train=True)
    stream = pl.train_pipeline([str(tmp_path / "junk.tar")], decoder, 2, 4, seed=0)
    with pytest.raises(RuntimeError, match="bad samples in a row"):
        next(iter(stream))


def test_short_video_is_skipped(digits_root):
    decoder = pl.ClipDecoder(num_frames=18, height=64, width=64, train=False)
    samples = _good_samples(digits_root, 2)
    assert list(decoder(iter(samples))) == []
    assert decoder.skipped == {"too_short": 2}


def test_two_ranks_get_different_samples_and_equal_batches(digits_root, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    train, val = {}, {}
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        dm = make_dm(digits_root, batches_per_epoch=4)
        dm.setup("fit")
        train[rank] = list(dm.train_dataloader())
        val[rank] = list(dm.val_dataloader())
    assert len(train[0]) == len(train[1]) == 4
    assert keys(train[0]) != keys(train[1])
    assert len(val[0]) == len(val[1]) == 2
    assert not set(keys(val[0])) & set(keys(val[1]))  # each rank reads its own val shard
    assert set(keys(val[0])) | set(keys(val[1])) == {f"digits_{i:06d}" for i in range(16)}
