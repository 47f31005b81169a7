"""Latent shards: bit-exact storage, extraction, streaming, bucketing and refusal of pickles."""

from __future__ import annotations

import io
import logging
import pickle
import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import webdataset as wds
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict

from src.data import latent_shards as ls
from src.data.latent_datamodule import LatentDataModule
from src.data.pipeline import ClipDecoder, val_pipeline
from src.data.shards import shard_files, write_digits_shards
from src.data.webvideo_datamodule import WebVideoDataModule
from src.extract import extract
from src.models.autoencoders import build_autoencoder
from src.models.text_encoders import build_text_encoder
from tests.conftest import CONFIG_DIR, compose_train

# 8 train + 4 val moving digits of 9 frames at 32x32: PCA(4x4x4, 8 ch) latents (8, 3, 8, 8)
VIDEO = dict(canvas_size=32, scale=2, speed=1, num_frames=9)
HASH = yaml.safe_load((Path(CONFIG_DIR) / "text_encoder" / "hash.yaml").read_text())
# header of hand-written shard sets: 4 latent channels, text (L, D) = (5, 8), pooled 6
HEADER = {
    "autoencoder": {"class": "Fake", "latent_channels": 4, "fingerprint": "0"},
    "text_encoder": {"name": "fake", "dim": 8, "pooled_dim": 6, "max_length": 5},
}


class _Payload:
    """Unpickling this creates ``path`` (a harmless stand-in for arbitrary code)."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def keys(batches) -> list[str]:
    return [m["key"] for b in batches for m in b["meta"]]


def read_tar(path) -> list[dict]:
    """Samples of a shard as ``{"__key__", ext: bytes}``, in file order."""
    samples: dict[str, dict] = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            samples.setdefault(key, {"__key__": key})[ext] = tar.extractfile(member).read()
    return list(samples.values())


def write_tar(path: Path, samples: list[dict]) -> None:
    with wds.TarWriter(str(path), encoder=False) as sink:
        for sample in samples:
            sink.write(sample)


def fake_samples(n: int, shapes, dtype: torch.dtype = torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        mask = torch.arange(5) < 2 + i % 4
        out.append(
            {
                "key": f"s_{i:04d}",
                "latent": (100 * torch.randn(shapes[i % len(shapes)], generator=g)).to(dtype),
                "tokens": (torch.randn(5, 8, generator=g) * mask[:, None]).to(dtype),
                "mask": mask,
                "pooled": torch.randn(6, generator=g).to(dtype),
                "caption": f"caption {i}",
                "meta": {"index": i},
            }
        )
    return out


def write_fake(root: Path, n: int = 8, shapes=((4, 2, 4, 4),), dtype="float32") -> dict:
    """Latent train/val splits of ``n`` samples each; returns {split: samples}."""
    null = {"tokens": torch.zeros(1, 5, 8), "mask": torch.ones(1, 5, dtype=bool)}
    null["pooled"] = torch.ones(1, 6)
    written = {}
    for i, split in enumerate(("train", "val")):
        samples = fake_samples(n, shapes, ls.DTYPES[dtype][0], seed=i)
        ls.write_latent_split(root / split, samples, HEADER, null, dtype, samples_per_shard=4)
        written[split] = samples
    return written


def make_dm(root, **kw) -> LatentDataModule:
    args = dict(batch_size=2, shuffle_buffer=4, batches_per_epoch=3, val_batches=2, seed=0)
    return LatentDataModule(str(root), **{**args, **kw})


def val_samples(dm: LatentDataModule) -> list[dict]:
    """Every val sample once, in order, through the datamodule's own decoder."""
    return list(val_pipeline(dm.val_urls, dm.val_decoder, None, split_by_node=False))


@pytest.fixture(scope="session")
def video_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("videos")
    write_digits_shards(root, num_train=8, num_val=4, samples_per_shard=4, seed=0, **VIDEO)
    return root


@pytest.fixture(scope="module")
def extracted(video_root, tmp_path_factory):
    """Latents of the tiny videos written by the real `src/extract.py` config and code."""
    out = tmp_path_factory.mktemp("latents") / "tiny"
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(
            "extract.yaml",
            overrides=[
                "text_encoder=hash",
                "autoencoder=pca",
                "autoencoder.latent_channels=8",
                "autoencoder.fit_samples=8",
                f"video.num_frames={VIDEO['num_frames']}",
                "video.height=32",
                "video.width=32",
                f"data.data_dir={video_root}",
                "data.generate_digits=false",
                f"out_dir={out}",
                "latent_dtype=float32",
                "sample_posterior=false",
                "batch_size=1",  # batched float matmuls may round differently per batch size
                "samples_per_shard=4",
                "decode_check=2",
                "extras.print_config=false",
                f"hydra.run.dir={out.parent}",
            ],
            return_hydra_config=True,
        )
    with open_dict(cfg):
        cfg.paths.output_dir = cfg.paths.log_dir = str(out.parent)
    HydraConfig().set_config(cfg)
    summary = extract(cfg)
    GlobalHydra.instance().clear()
    return out, summary


# ---------------------------------------------------------------- storage


@pytest.mark.parametrize("name", ["float32", "float16", "bfloat16"])
def test_arrays_and_shards_round_trip_bit_exact(name, tmp_path):
    dtype, _ = ls.DTYPES[name]
    bits = {torch.float32: torch.int32}.get(dtype, torch.int16)
    specials = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 1e-40, 3e38])
    x = torch.cat([torch.randn(60) * 1e3, specials]).to(dtype).reshape(1, 6, 11)
    y = ls.stored_tensor(ls.load_npy(ls.npy_bytes(x, name)), name)
    assert y.dtype == dtype and torch.equal(y.view(bits), x.view(bits))

    written = write_fake(tmp_path, dtype=name)["val"]
    dm = make_dm(tmp_path)
    dm.setup("validate")
    assert dm.manifest["latent_dtype"] == dm.manifest["text_dtype"] == name
    got = {s["meta"]["key"]: s for s in val_samples(dm)}
    assert sorted(got) == [s["key"] for s in written]
    for s in written:
        out = got[s["key"]]
        assert out["latent"].dtype == torch.float32  # float32 upcast of the stored values
        assert torch.equal(out["latent"].to(dtype).view(bits), s["latent"].view(bits))
        assert torch.equal(out["text"]["tokens"].to(dtype).view(bits), s["tokens"].view(bits))
        assert torch.equal(out["text"]["pooled"].to(dtype).view(bits), s["pooled"].view(bits))
        assert torch.equal(out["text"]["mask"], s["mask"]) and out["caption"] == s["caption"]


# ---------------------------------------------------------------- extraction


def test_extraction_gives_exactly_the_encoders_outputs(extracted, video_root):
    out, summary = extracted
    assert {k: summary[k]["samples"] for k in ("train", "val")} == {"train": 8, "val": 4}
    dm = make_dm(out, val_batches=2)
    dm.setup("fit")
    manifest = dm.manifest
    assert manifest["shapes"] == {"8x3x8x8": 8} and manifest["num_skipped"] == 0
    assert manifest["latent_dtype"] == "float32" and manifest["autoencoder_state"]
    assert manifest["text_encoder"]["config"] == HASH
    assert manifest["autoencoder_config"]["latent_channels"] == 8

    ae = build_autoencoder(
        _target_="src.models.pca_autoencoder.PCAAutoencoder",
        spatial_factor=4,
        temporal_factor=4,
        latent_channels=8,
    )
    ae.load_state_dict(dm.autoencoder_state)
    assert ae.describe() == manifest["autoencoder"]  # fingerprint of the restored PCA
    te = build_text_encoder(**HASH)
    decoder = ClipDecoder(VIDEO["num_frames"], 32, 32, train=False)
    urls = [str(p) for p in shard_files(video_root / "val")]
    clips = {c["meta"]["key"]: c for c in val_pipeline(urls, decoder, None)}

    batches = list(dm.val_dataloader())
    assert sorted(keys(batches)) == sorted(clips)
    for batch in batches:
        assert batch["latent"].shape == (2, 8, 3, 8, 8) and batch["latent"].dtype == torch.float32
        for i, meta in enumerate(batch["meta"]):
            clip = clips[meta["source_key"]]
            assert (meta["frames"], meta["height"], meta["width"]) == (9, 32, 32)
            assert torch.equal(batch["latent"][i], ae.encode_raw(clip["video"][None])[0])
            feats = te.encode([clip["caption"]])
            assert batch["caption"][i] == clip["caption"]
            assert torch.equal(batch["text"]["tokens"][i], feats.tokens[0])
            assert torch.equal(batch["text"]["mask"][i], feats.mask[0])
            assert torch.equal(batch["text"]["pooled"][i], feats.pooled[0])
    train = list(dm.train_dataloader())
    assert len(train) == 3 and all(b["text"]["tokens"].shape == (2, 16, 32) for b in train)

    check = out / "decode_check"
    assert len(list(check.glob("*.mp4"))) == 2 and (check / "strip.png").is_file()
    assert summary["decode_check"]["psnr_db"] > 15


def test_null_text_is_the_encoders_empty_prompt(extracted):
    dm = make_dm(extracted[0])
    dm.setup("fit")
    empty = build_text_encoder(**HASH).empty_features(1)
    assert dm.null_text.batch_size == 1
    assert torch.equal(dm.null_text.tokens, empty.tokens)
    assert torch.equal(dm.null_text.mask, empty.mask)
    assert torch.equal(dm.null_text.pooled, empty.pooled)


# ---------------------------------------------------------------- bad samples


def _proof_payload_is_live(tmp_path: Path) -> None:
    proof = tmp_path / "proof"
    pickle.loads(pickle.dumps(_Payload(proof)))
    assert proof.is_file()  # so "marker does not exist" below means "was never unpickled"


def test_pickle_members_are_refused_and_never_loaded(tmp_path, caplog):
    _proof_payload_is_live(tmp_path)
    marker = tmp_path / "unpickled"
    write_fake(tmp_path / "data")
    evil_npy = io.BytesIO()
    np.save(evil_npy, np.array([_Payload(marker)], dtype=object), allow_pickle=True)
    for split in ("train", "val"):
        good = read_tar(shard_files(tmp_path / "data" / split)[0])
        bad = [
            {**good[0], "__key__": "evil_pth", "pth": pickle.dumps(_Payload(marker))},
            {**good[1], "__key__": "evil_npy", "latent.npy": evil_npy.getvalue()},
            {**good[2], "__key__": "odd_member", "png": b"\x89PNG"},
        ]
        write_tar(tmp_path / "data" / split / "zz-evil.tar", bad + good)
    for path in shard_files(tmp_path / "data" / "train")[:-1]:
        path.unlink()  # training streams only the shard with the bad samples

    dm = make_dm(tmp_path / "data", batches_per_epoch=6)
    dm.setup("fit")
    with caplog.at_level(logging.WARNING):
        batches = list(dm.train_dataloader())
        samples = val_samples(dm)
    assert len(batches) == 6 and not any(k.startswith(("evil", "odd")) for k in keys(batches))
    assert dm.skipped["train"]["unsafe_member"] >= 1
    assert dm.val_decoder.skipped == {"unsafe_member": 1, "bad_array": 1, "unexpected_member": 1}
    assert len(samples) == 8 + 4  # the good ones of both val shards
    url = str(tmp_path / "data" / "val" / "zz-evil.tar")
    lines = [r.getMessage() for r in caplog.records]
    line = next(m for m in lines if f"shard {url}: sample evil_pth" in m)
    assert "\n" not in line and "refused member evil_pth.pth (pickle-capable .pth" in line
    assert any("refused member odd_member.png" in m for m in lines)
    assert not marker.exists()


def test_video_pipeline_refuses_pickle_members(video_root, tmp_path, caplog):
    _proof_payload_is_live(tmp_path)
    marker = tmp_path / "unpickled"
    good = read_tar(shard_files(video_root / "train")[0])
    evil = {**good[0], "__key__": "evil", "pyd": pickle.dumps(_Payload(marker))}
    for split in ("train", "val"):
        (tmp_path / split).mkdir()
        write_tar(tmp_path / split / "x-000000.tar", [evil, *good])
    dm = WebVideoDataModule(
        str(tmp_path),
        batch_size=2,
        num_frames=9,
        height=32,
        width=32,
        shuffle_buffer=2,
        batches_per_epoch=3,
        val_batches=1,
    )
    dm.setup("fit")
    with caplog.at_level(logging.WARNING):
        batches = list(dm.train_dataloader())
    assert len(batches) == 3 and "evil" not in keys(batches)
    assert dm.skipped["train"]["unsafe_member"] >= 1
    assert "refused member evil.pyd (pickle-capable .pyd" in caplog.text
    assert not marker.exists()


def test_wrong_shapes_are_skipped_and_counted(tmp_path):
    write_fake(tmp_path)
    good = read_tar(shard_files(tmp_path / "val")[0])
    wrong = [
        ("bad_channels", "latent.npy", ls.npy_bytes(torch.zeros(3, 2, 4, 4), "float32")),
        ("bad_ndim", "latent.npy", ls.npy_bytes(torch.zeros(4, 2, 4), "float32")),
        ("bad_text", "text.npy", ls.npy_bytes(torch.zeros(5, 7), "float32")),
        ("bad_pooled", "pooled.npy", ls.npy_bytes(torch.zeros(5), "float32")),
        ("bad_dtype", "latent.npy", ls.npy_bytes(torch.zeros(4, 2, 4, 4), "float16")),
    ]
    bad = [{**good[0], "__key__": key, member: data} for key, member, data in wrong]
    write_tar(tmp_path / "val" / "zz-bad.tar", bad + good)
    dm = make_dm(tmp_path)
    dm.setup("validate")
    samples = val_samples(dm)
    assert len(samples) == 8 + 4 and not any(s["meta"]["key"].startswith("bad") for s in samples)
    assert dm.skipped["val"] == {"bad_shape": 4, "bad_dtype": 1}


# ---------------------------------------------------------------- bucketing and errors


def test_batches_hold_one_latent_shape_and_every_sample_appears(tmp_path):
    shapes = [(4, 2, 4, 4), (4, 1, 4, 6)]
    written = write_fake(tmp_path, n=12, shapes=shapes)
    assert ls.read_latent_manifest(tmp_path / "val")["shapes"] == {"4x1x4x6": 6, "4x2x4x4": 6}
    dm = make_dm(tmp_path, batch_size=3, val_batches=4, batches_per_epoch=8)
    dm.setup("fit")
    val = list(dm.val_dataloader())
    assert sorted(keys(val)) == sorted(s["key"] for s in written["val"])  # each exactly once
    by_key = {s["key"]: tuple(s["latent"].shape) for s in written["val"]}
    for batch in val:
        assert {by_key[k] for k in keys([batch])} == {tuple(batch["latent"].shape[1:])}
    train = list(dm.train_dataloader())
    assert len(train) == 8
    assert {tuple(b["latent"].shape[1:]) for b in train} == set(shapes)


def test_two_ranks_get_different_samples_and_equal_batches(tmp_path, monkeypatch):
    write_fake(tmp_path, n=16)  # 4 shards per split
    monkeypatch.setenv("WORLD_SIZE", "2")
    train, val = {}, {}
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        dm = make_dm(tmp_path, batches_per_epoch=4, val_batches=4)
        dm.setup("fit")
        train[rank], val[rank] = list(dm.train_dataloader()), list(dm.val_dataloader())
    assert len(train[0]) == len(train[1]) == 4 and keys(train[0]) != keys(train[1])
    assert len(val[0]) == len(val[1]) == 4 and not set(keys(val[0])) & set(keys(val[1]))
    assert len(set(keys(val[0])) | set(keys(val[1]))) == 16


def test_missing_folder_or_manifest_fails_in_one_line(tmp_path, video_root):
    with pytest.raises(FileNotFoundError) as info:
        make_dm(tmp_path / "nowhere").setup("fit")
    message = str(info.value)
    assert "\n" not in message and "python src/extract.py" in message
    assert str(tmp_path / "nowhere" / "train") in message

    write_fake(tmp_path / "data")
    (tmp_path / "data" / "train" / "manifest.json").unlink()
    with pytest.raises(FileNotFoundError, match="no manifest.json") as info:
        make_dm(tmp_path / "data").setup("fit")
    assert "\n" not in str(info.value) and "python src/extract.py" in str(info.value)

    with pytest.raises(ValueError, match="data=digits_video"):
        make_dm(video_root).setup("fit")  # mp4 shards are not latent shards


def test_latent_configs_compose(tmp_path):
    cfg = compose_train(["data=digits_latents", f"paths.data_dir={tmp_path}"])
    dm = instantiate(cfg.data)
    assert isinstance(dm, LatentDataModule) and dm.data_dir == tmp_path / "latents" / "digits"
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("extract.yaml", overrides=[f"paths.data_dir={tmp_path}"])
    assert cfg.out_dir == f"{tmp_path}/latents/digits" and cfg.latent_dtype == "bfloat16"
    assert cfg.data.data_dir == f"{tmp_path}/shards/digits"
    assert OmegaConf.to_container(cfg.data, resolve=True)["num_frames"] == 17
    GlobalHydra.instance().clear()


# ---------------------------------------------------------------- training on latents


def test_training_from_latents_and_from_videos_gives_the_same_loss(extracted, video_root):
    """Same sample, same noise, same ratios: the module's loss from a latent-shard batch equals
    its loss from the video-shard batch (float32 storage, posterior mean), and CFG dropout uses
    the stored empty-prompt features."""
    from src.models.pyramid_module import PyramidFlowModule

    dm = make_dm(extracted[0], val_batches=2)
    dm.setup("fit")
    cfg = compose_train(
        [
            "experiment=tiny",
            "model.sample_posterior=false",
            "autoencoder.latent_channels=8",
            f"video.num_frames={VIDEO['num_frames']}",
        ]
    )
    kwargs = OmegaConf.to_container(cfg.model, resolve=True)
    kwargs.pop("_target_"), kwargs.pop("_convert_"), kwargs.pop("_recursive_")
    torch.manual_seed(0)
    module = PyramidFlowModule(**kwargs)
    module.configure_model()
    assert not module.autoencoder.is_fitted
    module.adopt_latent_dataset(dm)  # restores the fitted PCA and the null text
    assert (
        module.autoencoder.describe()["fingerprint"] == dm.manifest["autoencoder"]["fingerprint"]
    )

    decoder = ClipDecoder(VIDEO["num_frames"], 32, 32, train=False)
    urls = [str(p) for p in shard_files(video_root / "val")]
    clips = {c["meta"]["key"]: c for c in val_pipeline(urls, decoder, None)}
    batch = next(iter(dm.val_dataloader()))
    videos = {
        "video": torch.stack([clips[m["source_key"]]["video"] for m in batch["meta"]]),
        "caption": [clips[m["source_key"]]["caption"] for m in batch["meta"]],
    }
    z_lat = module.batch_latents(batch)
    # one video at a time, like the extraction (batched matmuls round differently per size)
    z_vid = torch.cat([module.batch_latents({"video": v[None]}) for v in videos["video"]])
    assert torch.equal(z_lat, z_vid)
    drop = torch.tensor([True, False])
    t_lat, t_vid = module.batch_text(batch, drop), module.batch_text(videos, drop)
    for a, b in zip(
        (t_lat.tokens, t_lat.mask, t_lat.pooled), (t_vid.tokens, t_vid.mask, t_vid.pooled)
    ):
        assert torch.equal(a, b)
    assert torch.equal(t_lat.tokens[0], dm.null_text.tokens[0])
    noise = torch.randn(z_lat.shape, generator=torch.Generator().manual_seed(1))
    r = torch.tensor([0.3, 0.8])
    loss_lat, _ = module.pyramid_loss(z_lat, t_lat, noise, r)
    loss_vid, _ = module.pyramid_loss(z_vid, t_vid, noise, r)
    assert torch.equal(loss_lat, loss_vid) and torch.isfinite(loss_lat).all()

    other = dict(dm.manifest["autoencoder"], fingerprint="0123")
    foreign = SimpleNamespace(
        manifest=dict(dm.manifest, autoencoder=other), null_text=None, autoencoder_state=None
    )
    with pytest.raises(ValueError, match="re-extract"):
        module.adopt_latent_dataset(foreign)


def test_train_entry_point_runs_on_latent_shards(extracted, tmp_path):
    from src.train import train

    cfg = compose_train(
        [
            "experiment=tiny",
            "data=digits_latents",
            f"data.data_dir={extracted[0]}",
            "~data.num_train",  # the tiny experiment's digits-generation keys
            "~data.num_val",
            "~data.samples_per_shard",
            "data.batch_size=4",
            "data.num_workers=0",
            "data.batches_per_epoch=2",
            "data.val_batches=1",
            "data.shuffle_buffer=4",
            "autoencoder.latent_channels=8",
            "text_encoder=hash",
            f"hydra.run.dir={tmp_path}",
        ]
    )
    with open_dict(cfg):
        cfg.paths.output_dir = cfg.paths.log_dir = str(tmp_path)
    HydraConfig().set_config(cfg)
    metrics = train(cfg)
    assert torch.isfinite(torch.tensor(metrics["val/loss"])) and "train/loss" in metrics
    assert list((tmp_path / "checkpoints").glob("last.ckpt"))
