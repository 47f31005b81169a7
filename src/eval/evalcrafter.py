"""EvalCrafter glue: the prompt list, its video naming, the metric -> model table, and the two
CLIP metrics computed here from locally provided weights.

EvalCrafter (Liu et al., CVPR 2024, github.com/evalcrafter/EvalCrafter) scores one video per
prompt of its 700-prompt list ``prompt700.txt``, named ``0000.mp4`` ... ``0699.mp4`` (the naming
``src/sample.py`` writes), with 17 objective metrics run by its docker pipeline
(``bash start.sh $EC_path $dir_videos``) and a dozen checkpoints. This module never downloads
anything. It computes:

* **CLIP-Score**: per video, the mean over frames of cos(image embedding, text embedding),
  reported times 100;
* **CLIP-Temp**: per video, the mean cos(image embedding of frame t, of frame t+1);

both with CLIP ViT-B/32 (``openai/clip-vit-base-patch32``) read from a local directory, and
averaged over videos as EvalCrafter does. The 15 other metrics are listed in ``not_computed``
with the model each one needs, never filled with made-up numbers.

Scale: EvalCrafter's ``metrics/Scores_with_CLIP/Scores_with_CLIP.py`` logs the plain cosine
means; its ``eval_from_metrics.py`` multiplies every metric by 100 for the printed table, and
feeds the plain fractions to its aggregate (Visual Quality / Text-Video Alignment / ...)
regressions. Here CLIP-Score is returned x100 (the table's scale) and CLIP-Temp as the plain
cosine mean (x100 gives the table's number).

Preprocessing: by default frames go through CLIP's own preprocessing (shortest-edge resize,
centre crop, rescale to [0, 1], mean/std normalisation, as ``CLIPImageProcessor``). The released
EvalCrafter script instead resizes frames to 224x224 and passes raw 0-255 floats to
``get_image_features`` without normalisation; ``preprocess="evalcrafter"`` reproduces that for
comparisons against published EvalCrafter numbers. The two give different values.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from src.data.video_io import read_mp4

NUM_PROMPTS = 700  # length of EvalCrafter's prompt700.txt
CLIP_REPO_ID = "openai/clip-vit-base-patch32"
# CLIP's normalisation (OPENAI_CLIP_MEAN / OPENAI_CLIP_STD), used when a directory has no
# preprocessor_config.json
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_DOVER = "DOVER (checkpoints/Dover)"
_SAM_TRACK = (
    "SAM-Track with Grounding-DINO (checkpoints/ckpt: SAM + Grounding-DINO weights, "
    "bert-base-uncased text encoder)"
)
_RAFT = "RAFT (checkpoints/RAFT/models/raft-things.pth)"
_CLIP = "CLIP ViT-B/32 (checkpoints/clip-vit-base-patch32)"

# EvalCrafter's 17 objective metrics -> the model / checkpoint each needs
METRIC_MODELS: dict[str, str] = {
    # video quality
    "VQA_A": f"{_DOVER}, aesthetic branch",
    "VQA_T": f"{_DOVER}, technical branch",
    "IS": "Inception v3 (checkpoints/pt_inception-2015-12-05-6726825d.pth)",
    # text-video alignment
    "CLIP-Score": _CLIP,
    "BLIP-BLEU": "BLIP-2 OPT-2.7B captioner (checkpoints/blip2-opt-2.7b) + BLEU-1..4",
    "SD-Score": (
        "SDXL base 1.0 (checkpoints/stable-diffusion-xl-base-1.0) reference images, "
        "compared with CLIP ViT-B/32"
    ),
    "Detection-Score": _SAM_TRACK,
    "Count-Score": _SAM_TRACK,
    "Color-Score": _SAM_TRACK,
    "Celebrity ID Score": "deepface VGG-Face (checkpoints/vgg_face_weights.h5)",
    "OCR Score": "PaddleOCR (detection + recognition models)",
    # motion quality
    "Action Score": (
        "mmaction2 VideoMAE V2 / TSN, Kinetics-400 (checkpoints/VideoMAE, "
        "tsn_imagenet-pretrained-r50_8xb32-1x1x8-100e_kinetics400-rgb_20220906-2692d16c.pth)"
    ),
    "Flow-Score": _RAFT,
    "Motion AC-Score": _RAFT,
    # temporal consistency
    "Warping Error": (
        f"{_RAFT} (the released optical_flow_scores.py uses RAFT; "
        "checkpoints/FlowNet2_checkpoint.pth.tar is also shipped)"
    ),
    "CLIP-Temp": _CLIP,
    "Face Consistency": (
        "deepface VGG-Face (checkpoints/vgg_face_weights.h5) face embeddings; note the "
        "released start.sh computes it with Scores_with_CLIP.py, i.e. CLIP ViT-B/32 "
        "image embeddings of frames 1.. against frame 0"
    ),
}

# metrics this module computes itself, given a local CLIP directory
OFFLINE_METRICS: tuple[str, ...] = ("CLIP-Score", "CLIP-Temp")

PROMPTS_HINT = (
    "the list is EvalCrafter's `prompt700.txt` from github.com/evalcrafter/EvalCrafter (not "
    "shipped here); put it on disk yourself and pass its path, nothing is downloaded"
)
CLIP_HINT = (
    f"download `{CLIP_REPO_ID}` yourself (e.g. `huggingface-cli download {CLIP_REPO_ID} "
    "--local-dir DIR`) and pass evalcrafter.clip_dir=DIR; nothing is downloaded here"
)


def read_prompts(path: str | os.PathLike) -> list[str]:
    """Read a prompt list, one prompt per line, blank lines skipped.

    Each prompt is the line's text with only its surrounding whitespace removed (EvalCrafter
    reads its per-video prompt files with ``.strip()``; ``prompt700.txt`` has trailing spaces
    on some lines). Line ``i`` (counting non-blank lines from 0) belongs to
    ``video_filename(i)``.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"evalcrafter.prompts_file: {str(p)!r} not found; {PROMPTS_HINT}")
    lines = p.read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip()]


def video_filename(i: int) -> str:
    """EvalCrafter's name for the video of prompt ``i``: ``0000.mp4`` ... ``0699.mp4``."""
    if i < 0:
        raise ValueError(f"prompt index must be >= 0, got {i}")
    return f"{i:04d}.mp4"


def _size_of(value: Any, key: str) -> int | tuple[int, int] | None:
    """Read an image-processor size field: an int or a dict (shortest_edge / height+width)."""
    if value is None:
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, dict):
        if key in value:
            return int(value[key])
        if "height" in value and "width" in value:
            return int(value["height"]), int(value["width"])
    raise ValueError(f"unsupported image-processor size {value!r}")


class ClipScorer:
    """CLIP-Score and CLIP-Temp with a CLIP model read from a local directory.

    Args:
        clip_dir: a directory written by ``save_pretrained`` (model, tokenizer and, optionally,
            ``preprocessor_config.json``), e.g. a local copy of ``openai/clip-vit-base-patch32``.
        device: torch device for the model.
        preprocess: ``"clip"`` (default) for CLIP's own preprocessing, ``"evalcrafter"`` to
            reproduce the released EvalCrafter script (224x224 resize, raw 0-255 pixels).
        batch_size: frames per forward pass.
    """

    def __init__(
        self,
        clip_dir: str | os.PathLike,
        device: str | torch.device = "cpu",
        preprocess: Literal["clip", "evalcrafter"] = "clip",
        batch_size: int = 32,
    ) -> None:
        from transformers import AutoTokenizer, CLIPModel

        path = Path(clip_dir).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(
                f"evalcrafter.clip_dir: CLIP model directory {str(path)!r} not found; {CLIP_HINT}"
            )
        if preprocess not in ("clip", "evalcrafter"):
            raise ValueError(f"preprocess must be 'clip' or 'evalcrafter', got {preprocess!r}")
        self.path = path
        self.device = torch.device(device)
        self.preprocess = preprocess
        self.batch_size = int(batch_size)
        self.model = CLIPModel.from_pretrained(path, local_files_only=True)
        self.model.to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.max_length = min(77, int(self.model.config.text_config.max_position_embeddings))
        self._read_image_config(int(self.model.config.vision_config.image_size))

    def _read_image_config(self, image_size: int) -> None:
        cfg: dict[str, Any] = {}
        cfg_path = self.path / "preprocessor_config.json"
        if cfg_path.is_file():
            cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        size = _size_of(cfg.get("size"), "shortest_edge")
        crop = _size_of(cfg.get("crop_size"), "shortest_edge")
        self.image_size = image_size
        self.do_resize = bool(cfg.get("do_resize", True))
        self.resize_to = image_size if size is None else size
        self.do_center_crop = bool(cfg.get("do_center_crop", True))
        crop = image_size if crop is None else crop
        self.crop_size = (crop, crop) if isinstance(crop, int) else crop
        self.do_rescale = bool(cfg.get("do_rescale", True))
        self.rescale_factor = float(cfg.get("rescale_factor", 1 / 255))
        self.do_normalize = bool(cfg.get("do_normalize", True))
        self.mean = torch.tensor(cfg.get("image_mean", CLIP_MEAN), dtype=torch.float32)
        self.std = torch.tensor(cfg.get("image_std", CLIP_STD), dtype=torch.float32)

    # ------------------------------------------------------------------ preprocessing

    def pixel_values(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 frames ``(T, H, W, 3)`` -> model input ``(T, 3, S, S)`` float32 (on CPU)."""
        x = torch.as_tensor(np.asarray(frames))
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"frames must be uint8 (T, H, W, 3), got {x.dtype} {tuple(x.shape)}")
        if x.shape[0] == 0:
            raise ValueError("no frames")
        x = x.permute(0, 3, 1, 2).to(torch.float32)  # (T, 3, H, W) in [0, 255]
        if self.preprocess == "evalcrafter":
            # released Scores_with_CLIP.py: resize to 224x224, raw 0-255 values, no normalising
            s = self.image_size
            return F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False)
        h, w = x.shape[-2:]
        if self.do_resize:
            if isinstance(self.resize_to, tuple):
                out = self.resize_to
            else:  # shortest edge -> resize_to, aspect ratio kept (CLIPImageProcessor)
                short, long = (h, w) if h <= w else (w, h)
                new_long = int(self.resize_to * long / short)
                out = (self.resize_to, new_long) if h <= w else (new_long, self.resize_to)
            if tuple(out) != (h, w):
                x = F.interpolate(x, size=out, mode="bicubic", align_corners=False, antialias=True)
                x = x.clamp(0.0, 255.0)
        if self.do_center_crop:
            x = _center_crop(x, self.crop_size)
        if self.do_rescale:
            x = x * self.rescale_factor
        if self.do_normalize:
            x = (x - self.mean.view(1, 3, 1, 1)) / self.std.view(1, 3, 1, 1)
        return x

    # ------------------------------------------------------------------ embeddings

    @torch.inference_mode()
    def image_embeddings(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings ``(T, D)`` of uint8 frames ``(T, H, W, 3)``."""
        pixels = self.pixel_values(frames)
        feats = []
        for start in range(0, pixels.shape[0], self.batch_size):
            batch = pixels[start : start + self.batch_size].to(self.device)
            feats.append(_features(self.model.get_image_features(pixel_values=batch)).float())
        emb = torch.cat(feats).cpu()
        return emb / emb.norm(dim=-1, keepdim=True)

    @torch.inference_mode()
    def text_embedding(self, prompt: str) -> torch.Tensor:
        """L2-normalised text embedding ``(D,)`` (truncated to CLIP's 77 tokens)."""
        tokens = self.tokenizer(
            prompt, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        tokens = {k: v.to(self.device) for k, v in tokens.items()}
        emb = _features(self.model.get_text_features(**tokens)).float().cpu()[0]
        return emb / emb.norm()

    # ------------------------------------------------------------------ metrics

    def clip_score(self, frames: np.ndarray | torch.Tensor, prompt: str) -> float:
        """EvalCrafter's CLIP-Score of one video, **times 100**.

        The mean over frames of the cosine similarity between each frame's CLIP image
        embedding and the prompt's text embedding, multiplied by 100 (EvalCrafter's script
        computes the plain cosine mean; its results table prints it x100). In [-100, 100];
        ~20-35 for real CLIP ViT-B/32 on matching content.

        Args:
            frames: uint8 ``(T, H, W, 3)`` RGB frames.
            prompt: the video's prompt.
        """
        sims = self.image_embeddings(frames) @ self.text_embedding(prompt)
        return float(sims.mean()) * 100.0

    def clip_temp(self, frames: np.ndarray | torch.Tensor) -> float:
        """EvalCrafter's CLIP-Temp of one video: the mean cosine similarity between the CLIP
        image embeddings of consecutive frames (plain fraction, 1 for a static video; the
        results table prints it x100). Needs at least 2 frames."""
        frames_t = np.asarray(frames)
        if frames_t.ndim != 4 or frames_t.shape[0] < 2:
            raise ValueError(f"CLIP-Temp needs >= 2 frames, got shape {frames_t.shape}")
        emb = self.image_embeddings(frames_t)
        return float((emb[:-1] * emb[1:]).sum(dim=-1).mean())

    def score_video(self, frames: np.ndarray | torch.Tensor, prompt: str) -> dict[str, float]:
        """Both metrics of one video, sharing one pass over its frames."""
        emb = self.image_embeddings(frames)
        if emb.shape[0] < 2:
            raise ValueError(f"CLIP-Temp needs >= 2 frames, got {emb.shape[0]}")
        return {
            "CLIP-Score": float((emb @ self.text_embedding(prompt)).mean()) * 100.0,
            "CLIP-Temp": float((emb[:-1] * emb[1:]).sum(dim=-1).mean()),
        }


def _features(out: Any) -> torch.Tensor:
    """``get_*_features`` returns a tensor (transformers 4) or an output whose
    ``pooler_output`` holds the projected embedding (transformers 5)."""
    if isinstance(out, torch.Tensor):
        return out
    return out.pooler_output


def _center_crop(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Centre crop ``(N, C, H, W)`` to ``size``, zero-padding first if the image is smaller."""
    th, tw = size
    h, w = x.shape[-2:]
    if h < th or w < tw:
        ph, pw = max(th - h, 0), max(tw - w, 0)
        x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
        h, w = x.shape[-2:]
    top, left = (h - th) // 2, (w - tw) // 2
    return x[..., top : top + th, left : left + tw]


def not_computed_table(computed: Sequence[str] = OFFLINE_METRICS) -> dict[str, str]:
    """The metrics left to EvalCrafter's own pipeline, each with the model it needs."""
    return {m: model for m, model in METRIC_MODELS.items() if m not in computed}


def score_dir(
    video_dir: str | os.PathLike,
    prompts: Sequence[str] | str | os.PathLike,
    clip_dir: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    preprocess: Literal["clip", "evalcrafter"] = "clip",
    scorer: ClipScorer | None = None,
) -> dict[str, Any]:
    """Score ``video_dir/0000.mp4 ...`` against ``prompts`` (a list, or a prompt-file path).

    Video ``video_filename(i)`` is paired with ``prompts[i]``; expected videos that are absent
    are counted in ``missing`` (and skipped), extra files are ignored.

    Returns:
        ``{"CLIP-Score": mean x100, "CLIP-Temp": mean cosine, "videos": n scored,
        "missing": n, "per_video": {name: {...}}, "not_computed": {metric: model}}`` with the
        15 other metrics in ``not_computed``. Without ``clip_dir`` (and ``scorer``) no metric
        is computed: the result has ``videos`` (found), ``missing``, a ``note`` saying the CLIP
        metrics need ``evalcrafter.clip_dir`` and all 17 metrics in ``not_computed``.
    """
    root = Path(video_dir).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"evalcrafter video directory {str(root)!r} not found")
    if isinstance(prompts, (str, os.PathLike)):
        prompts = read_prompts(prompts)
    prompts = list(prompts)
    present = [(i, root / video_filename(i)) for i in range(len(prompts))]
    found = [(i, p) for i, p in present if p.is_file()]
    missing = len(present) - len(found)

    if scorer is None and clip_dir is None:
        table = not_computed_table(computed=())
        for m in OFFLINE_METRICS:
            table[m] = f"{table[m]}: needs evalcrafter.clip_dir ({CLIP_HINT})"
        return {
            "videos": len(found),
            "missing": missing,
            "note": f"CLIP-Score and CLIP-Temp need evalcrafter.clip_dir; {CLIP_HINT}",
            "not_computed": table,
        }
    if not found:
        raise FileNotFoundError(
            f"no EvalCrafter videos ({video_filename(0)} ... "
            f"{video_filename(max(len(prompts) - 1, 0))}) in {str(root)!r}"
        )
    if scorer is None:
        scorer = ClipScorer(clip_dir, device=device, preprocess=preprocess)
    per_video: dict[str, dict[str, float]] = {}
    for i, path in found:
        per_video[path.name] = scorer.score_video(read_mp4(path), prompts[i])
    result: dict[str, Any] = {
        m: float(np.mean([v[m] for v in per_video.values()])) for m in OFFLINE_METRICS
    }
    result.update(
        videos=len(found),
        missing=missing,
        per_video=per_video,
        not_computed=not_computed_table(),
    )
    return result
