"""Corrupt data (issue 7): bad samples are skipped and counted (data/skipped), training
finishes on a shard set with 10 % bad members, and only a bad fraction above
data.max_bad_fraction stops a run, with one line. Missing shards fail before a model is built."""

from __future__ import annotations

import io
import random
import tarfile
from pathlib import Path

import pytest
import torch

import src.data.pipeline as pipeline
from src.data.pipeline import BadSample, SampleDecoder
from src.data.shards import shard_files, write_digits_shards
from src.train import train
from tests.conftest import tiny_cfg


class _Decoder(SampleDecoder):
    def decode(self, sample, rng=None):
        if sample["bad"]:
            raise BadSample("bad", "planted")
        return {"meta": {}, "x": sample["i"]}


def _stream(n: int, bad_every: int) -> list[dict]:
    return [{"i": i, "bad": i % bad_every == 0, "__key__": str(i)} for i in range(n)]


def test_a_tenth_bad_is_skipped_and_counted_with_running_counts_in_meta():
    dec = _Decoder(train=True, max_bad_fraction=0.25, min_samples=20)
    out = list(dec(_stream(200, 10)))
    assert len(out) == 180 and dec.skipped == {"bad": 20}
    last = out[-1]["meta"]
    assert last["data_seen"] == 200  # the last sample (199) is good
    assert last["data_skipped"] == 20 and last["data_stream"] == "train:0"


def test_a_bad_fraction_above_the_limit_stops_with_one_line():
    dec = _Decoder(train=True, max_bad_fraction=0.25, min_samples=20)
    with pytest.raises(RuntimeError, match=r"data.max_bad_fraction=0.25 exceeded: \d+ of \d+"):
        list(dec(_stream(200, 2)))  # half bad
    with pytest.raises(ValueError, match="data.max_bad_fraction=1.5 must lie in"):
        _Decoder(train=True, max_bad_fraction=1.5)


def _corrupt_shards(split_dir: Path, fraction: float, seed: int = 0) -> int:
    """Rewrite the shards with `fraction` of their samples broken in four ways; returns how
    many samples were broken."""
    rng = random.Random(seed)
    broken = 0
    for shard in shard_files(split_dir):
        with tarfile.open(shard) as tar:
            members = [(m, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()]
        keys = sorted({m.name.split(".", 1)[0] for m, _ in members})
        bad = {k: rng.choice(["empty_mp4", "garbage_mp4", "no_caption", "bad_json"])
               for k in rng.sample(keys, max(1, round(fraction * len(keys))))}  # fmt: skip
        broken += len(bad)
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as out:
            for m, data in members:
                key, ext = m.name.split(".", 1)
                kind = bad.get(key)
                if kind == "no_caption" and ext == "txt":
                    continue
                if ext == "mp4" and kind in ("empty_mp4", "garbage_mp4"):
                    data = (
                        b""
                        if kind == "empty_mp4"
                        else bytes(rng.randrange(256) for _ in range(999))
                    )
                if ext == "json" and kind == "bad_json":
                    data = b"{not json"
                info = tarfile.TarInfo(m.name)
                info.size = len(data)
                out.addfile(info, io.BytesIO(data))
        shard.write_bytes(buf.getvalue())
    return broken


@pytest.fixture
def corrupt_data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corrupt")
    write_digits_shards(root / "shards" / "digits", 40, 8, samples_per_shard=10, seed=0)
    broken = _corrupt_shards(root / "shards" / "digits" / "train", 0.10)
    assert broken == 4  # 10 % of 40
    return root


def _csv_column(path: Path, name: str) -> list[float]:
    rows = path.read_text().splitlines()
    col = rows[0].split(",").index(name)
    return [float(r.split(",")[col]) for r in rows[1:] if r.split(",")[col]]


def test_training_on_ten_percent_corrupt_shards_finishes_and_logs_the_skips(
    tmp_path, corrupt_data_dir
):
    cfg = tiny_cfg(tmp_path, corrupt_data_dir, ["trainer.max_steps=8", "data.num_train=40"])
    train(cfg)
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 8
    skipped = _csv_column(tmp_path / "csv" / "metrics.csv", "data/skipped")
    fraction = _csv_column(tmp_path / "csv" / "metrics.csv", "data/bad_fraction")
    assert skipped[-1] >= 1 and skipped == sorted(skipped)  # running count
    assert 0.0 < fraction[-1] < 0.3


def test_a_stricter_limit_stops_the_run_with_one_clear_line(
    tmp_path, corrupt_data_dir, monkeypatch
):
    monkeypatch.setattr(pipeline, "MIN_SAMPLES_FOR_FRACTION", 5)
    cfg = tiny_cfg(
        tmp_path,
        corrupt_data_dir,
        ["trainer.max_steps=40", "data.max_bad_fraction=0.01", "data.num_train=40"],
    )
    with pytest.raises(RuntimeError, match=r"data.max_bad_fraction=0.01 exceeded: .*fix: repair"):
        train(cfg)


@pytest.mark.parametrize("data", ["digits_video", "digits_latents"])
def test_missing_shards_fail_before_any_model_is_built(tmp_path, data, monkeypatch):
    built = []
    import src.models.pyramid_module as pm

    monkeypatch.setattr(pm.PyramidFlowModule, "__init__", lambda *a, **k: built.append(1))
    extra = [f"data={data}", "data.batch_size=4", f"data.data_dir={tmp_path / 'nowhere'}"]
    if data == "digits_video":
        extra.append("data.generate_digits=false")
    else:  # the tiny experiment sets digits-rendering keys the latent module does not take
        extra += ["~data.num_train", "~data.num_val", "~data.samples_per_shard"]
    cfg = tiny_cfg(tmp_path, tmp_path, extra)
    with pytest.raises((FileNotFoundError, ValueError), match="data.data_dir="):
        train(cfg)
    assert not built


def test_a_truncated_shard_keeps_its_readable_samples_and_counts_one_shard_error(tmp_path):
    write_digits_shards(tmp_path, 0, 10, samples_per_shard=5, seed=0, splits=["val"])
    first, second = shard_files(tmp_path / "val")
    first.write_bytes(first.read_bytes()[: first.stat().st_size // 2])  # cut mid-member
    dec = pipeline.ClipDecoder(9, 32, 32, train=False)
    out = list(pipeline.val_pipeline([str(first), str(second)], dec, None, False))
    assert 5 < len(out) < 10  # the second shard whole, the first one's readable head
    assert dec.skipped["shard_error"] == 1


def test_the_stream_resumes_at_its_next_unused_epoch_however_often_it_is_resumed(tiny_data_dir):
    from src.data.webvideo_datamodule import WebVideoDataModule

    kw = dict(batch_size=2, num_frames=9, height=32, width=32, batches_per_epoch=2,
              shuffle_buffer=4, generate_digits=False)  # fmt: skip
    dm = WebVideoDataModule(str(tiny_data_dir / "shards" / "digits"), **kw)
    loader = dm.train_dataloader()
    epochs = [[b["meta"][0]["key"] for b in loader] for _ in range(3)]
    iter(loader)  # a bare iter() (Lightning's iterability check) starts no epoch
    assert dm.state_dict() == {"next_stream_epoch": 3}
    half = next(iter(loader))  # an interrupted epoch counts as used
    assert half is not None and dm.state_dict() == {"next_stream_epoch": 4}
    resumed = WebVideoDataModule(str(tiny_data_dir / "shards" / "digits"), **kw)
    resumed.load_state_dict({"next_stream_epoch": 1})
    loader2 = resumed.train_dataloader()
    again = [[b["meta"][0]["key"] for b in loader2] for _ in range(2)]
    assert again == epochs[1:]  # stream epochs 1 and 2, exactly
    assert resumed.state_dict() == {"next_stream_epoch": 3}
