"""EvalCrafter glue: prompt list, naming, metric table, and CLIP-Score / CLIP-Temp with a tiny
random CLIP saved to disk (loaded back through the same code path as a real CLIP directory)."""

from __future__ import annotations

import string

import numpy as np
import pytest
import torch

from src.data.video_io import write_mp4
from src.eval import evalcrafter as ec


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    specials = ["<|startoftext|>", "<|endoftext|>"]
    # byte-level symbols: every lowercase letter, alone and as a word end
    symbols = list(string.ascii_lowercase) + [c + "</w>" for c in string.ascii_lowercase]
    symbols += [".", ".</w>", ",</w>"]
    vocab = {tok: i for i, tok in enumerate(specials + symbols)}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(vocab),
            max_position_embeddings=77,
            bos_token_id=vocab["<|startoftext|>"],
            eos_token_id=vocab["<|endoftext|>"],
            pad_token_id=vocab["<|endoftext|>"],
            **common,
        ),
        vision_config=dict(image_size=32, patch_size=8, **common),
        projection_dim=16,
    )
    torch.manual_seed(0)
    model = CLIPModel(config).eval()
    path = tmp_path_factory.mktemp("tiny_clip")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    CLIPImageProcessor(size=32, crop_size=32).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def scorer(clip_dir):
    return ec.ClipScorer(clip_dir)


def _video(seed: int, t: int = 4, h: int = 24, w: int = 40) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (t, h, w, 3), dtype=np.uint8)


def test_tokenizer_roundtrip(scorer):
    ids = scorer.tokenizer("a cat.")["input_ids"]
    assert ids[0] == scorer.tokenizer.bos_token_id and ids[-1] == scorer.tokenizer.eos_token_id
    assert scorer.tokenizer.unk_token_id not in ids[1:-1]


def test_preprocessing(scorer):
    x = scorer.pixel_values(_video(0))
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32
    # CLIP normalisation: [0, 255] -> roughly [-1.8, 2.2]
    assert -2.0 < x.min() and x.max() < 2.3
    release = ec.ClipScorer(scorer.path, preprocess="evalcrafter")
    y = release.pixel_values(_video(0))
    assert y.shape == (4, 3, 32, 32) and y.max() > 100  # raw 0-255 pixels, as released


def test_clip_temp(scorer):
    frame = _video(1, t=1)
    static = np.repeat(frame, 5, axis=0)
    assert scorer.clip_temp(static) == pytest.approx(1.0, abs=1e-5)
    assert scorer.clip_temp(_video(2, t=5)) < 1.0 - 1e-4
    with pytest.raises(ValueError, match="2 frames"):
        scorer.clip_temp(frame)


def test_clip_score(scorer):
    video = _video(3)
    a = scorer.clip_score(video, "a red fox jumps over the lazy dog")
    b = scorer.clip_score(video, "several blue whales")
    assert abs(a) <= 100 and abs(b) <= 100
    assert a != pytest.approx(b, abs=1e-6)
    assert scorer.clip_score(video, "a red fox jumps over the lazy dog") == a
    both = scorer.score_video(video, "several blue whales")
    assert both["CLIP-Score"] == pytest.approx(b, abs=1e-4)
    assert both["CLIP-Temp"] == pytest.approx(scorer.clip_temp(video), abs=1e-6)


def test_score_dir(tmp_path, clip_dir):
    videos = tmp_path / "videos"
    videos.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(2):
        clip = torch.rand(3, 4, 32, 32, generator=g) * 2 - 1  # (3, T, H, W) in [-1, 1]
        write_mp4(videos / ec.video_filename(i), clip, fps=8)
    prompt_file = tmp_path / "prompt700.txt"
    prompt_file.write_text("a cat\n\nthe ocean at night \n")
    prompts = ec.read_prompts(prompt_file)
    assert prompts == ["a cat", "the ocean at night"]

    out = ec.score_dir(videos, prompt_file, clip_dir=clip_dir)
    assert out["videos"] == 2 and out["missing"] == 0
    assert abs(out["CLIP-Score"]) <= 100 and 0 < out["CLIP-Temp"] <= 1 + 1e-6
    per = out["per_video"]
    assert set(per) == {"0000.mp4", "0001.mp4"}
    assert out["CLIP-Score"] == pytest.approx(np.mean([v["CLIP-Score"] for v in per.values()]))
    table = out["not_computed"]
    assert len(table) == 15 and not set(table) & set(ec.OFFLINE_METRICS)
    assert "DOVER" in table["VQA_A"] and "RAFT" in table["Flow-Score"]

    # a third prompt without its video counts as missing
    out3 = ec.score_dir(videos, prompts + ["a horse"], clip_dir=clip_dir)
    assert out3["videos"] == 2 and out3["missing"] == 1

    bare = ec.score_dir(videos, prompts)
    assert "CLIP-Score" not in bare and "CLIP-Temp" not in bare
    assert "clip_dir" in bare["note"] and len(bare["not_computed"]) == 17
    assert bare["videos"] == 2


def test_missing_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"evalcrafter\.prompts_file.*prompt700\.txt"):
        ec.read_prompts(tmp_path / "nope.txt")
    with pytest.raises(FileNotFoundError, match=r"evalcrafter\.clip_dir.*clip-vit-base-patch32"):
        ec.ClipScorer(tmp_path / "no_clip")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no EvalCrafter videos"):
        ec.score_dir(tmp_path / "empty", ["a cat"], clip_dir=tmp_path / "no_clip")


def test_naming_and_table():
    assert ec.video_filename(7) == "0007.mp4"
    assert ec.video_filename(699) == "0699.mp4"
    assert len(ec.METRIC_MODELS) == 17
    assert set(ec.OFFLINE_METRICS) == {"CLIP-Score", "CLIP-Temp"} <= set(ec.METRIC_MODELS)
    assert len(ec.not_computed_table()) == 15


def test_preprocessing_matches_clip_image_processor(scorer):
    from transformers import CLIPImageProcessor

    # a smooth non-square frame: shortest-edge resize + centre crop, as CLIP's processor
    coarse = torch.from_numpy(_video(4, t=1, h=9, w=16)).permute(0, 3, 1, 2).float()
    smooth = torch.nn.functional.interpolate(coarse, size=(72, 128), mode="bilinear")
    frames = smooth.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    ref = CLIPImageProcessor.from_pretrained(scorer.path)(images=list(frames), return_tensors="pt")
    ours = scorer.pixel_values(frames)
    assert ours.shape == ref["pixel_values"].shape
    assert (ours - ref["pixel_values"]).abs().mean() < 0.02
