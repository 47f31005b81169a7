"""Sample videos from a checkpoint.

python src/sample.py ckpt_path=PATH prompts_file=FILE out_dir=DIR [steps=[8,8,8]] [seed=0]
FILE: .txt (one prompt a line; lines starting with # are comments) or .jsonl (a "prompt" field
a line). Writes DIR/0000.mp4, ...
in prompt order and DIR/samples.jsonl (prompt, seed, steps per stage, guidance, frames, fps,
checkpoint sha256).

Autoregressive checkpoints also take init_image=PNG (image-to-video: the image becomes latent
frame 0) or init_video=MP4 (continuation: its frames become history, the rest is generated),
num_frames=N (at most the trained clip), video_steps / video_guidance_scale (frames after the
first; `steps=`/`guidance_scale=` set the first frame only) and kv_cache=true (models trained
with temporal.history_timestep=clean).
"""

from __future__ import annotations

import json
from pathlib import Path

import hydra
import rootutils
import torch
from omegaconf import DictConfig, OmegaConf

rootutils.setup_root(__file__, indicator=".project-root", pythonpath=True)

from src.data.video_io import read_video  # noqa: E402
from src.models import generation  # noqa: E402
from src.models.checkpoint import load_module  # noqa: E402
from src.utils import RankedLogger  # noqa: E402
from src.utils.checkpoint_io import sha256_file  # noqa: E402
from src.utils.visualize import save_frame_strip  # noqa: E402

log = RankedLogger(__name__)
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def read_prompts(path: str | Path) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(
            f"prompts_file={path} does not exist; fix: a .txt file (one prompt a line) or a "
            '.jsonl file (a "prompt" field a line)'
        )
    lines = [ln for ln in p.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    if p.suffix == ".jsonl":
        prompts = []
        for i, ln in enumerate(lines):
            row = json.loads(ln)
            if "prompt" not in row:
                raise ValueError(f'prompts_file={path} line {i + 1} has no "prompt" field')
            prompts.append(str(row["prompt"]))
    else:
        prompts = [ln.strip() for ln in lines]
    if not prompts:
        raise ValueError(f"prompts_file={path} holds no prompts; fix: one prompt a line")
    return prompts


def read_init(cfg: DictConfig) -> tuple[torch.Tensor | None, str | None]:
    """The init image or clip as (1, 3, n, H, W) in [-1, 1], and its path (or None, None)."""
    image, video = cfg.get("init_image"), cfg.get("init_video")
    if image and video:
        raise ValueError("init_image and init_video are both set; fix: give one of them")
    path = image or video
    if not path:
        return None, None
    if not Path(path).is_file():
        raise FileNotFoundError(f"{'init_image' if image else 'init_video'}={path} does not exist")
    frames, _ = read_video(path)  # (n, H, W, 3) uint8; PyAV decodes PNG/JPEG as one frame
    if image:
        frames = frames[:1]
    x = torch.from_numpy(frames).permute(3, 0, 1, 2).float() / 127.5 - 1.0  # (3, n, H, W)
    return x[None], str(path)


def sample(cfg: DictConfig) -> Path:
    if (cfg.get("precision") or "fp32") not in PRECISIONS:
        raise ValueError(f"precision={cfg.precision} is unknown; fix: one of {list(PRECISIONS)}")
    prompts = read_prompts(cfg.prompts_file)
    dtype = PRECISIONS[cfg.get("precision") or "fp32"]
    offload = bool(cfg.get("offload", False))
    ae = {k: v for k, v in (cfg.get("autoencoder") or {}).items() if v is not None}
    # with offload the module stays on the CPU; its parts visit cfg.device in turn
    module = load_module(cfg.ckpt_path, "cpu" if offload else cfg.device, ae, dtype)
    sha = sha256_file(cfg.ckpt_path)
    init, init_path = read_init(cfg)
    given = {k: cfg[k] for k in generation.SETTINGS if cfg.get(k) is not None}
    settings = generation.resolve_settings(module.hparams.sampling, module.autoregressive, **given)
    fps = module.hparams.video["fps"]
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records, strips = [], []
    batches = generation.generate_batches(
        module, prompts, cfg.seed, cfg.batch_size, num_frames=cfg.get("num_frames"),
        init_video=init, device=cfg.device, offload=offload, dtype=dtype, **given,
    )  # fmt: skip
    for start, chunk, _, videos in batches:
        strips.append(videos)
        names = generation.write_videos(out, videos, start, fps)
        for j, (name, prompt, video) in enumerate(zip(names, chunk, videos)):
            record = {
                "file": name,
                "prompt": prompt,
                "seed": cfg.seed + start + j,
                "steps_per_stage": settings["steps"],
                "guidance_scale": settings["guidance_scale"],
                "negative_prompt": settings["negative_prompt"],
                "frames": int(video.shape[1]),
                "height": int(video.shape[2]),
                "width": int(video.shape[3]),
                "fps": fps,
                "ckpt_path": str(cfg.ckpt_path),
                "ckpt_sha256": sha,
                "temporal": dict(module.temporal),
                "precision": cfg.get("precision") or "fp32",
            }
            if module.autoregressive:
                record.update(
                    video_steps_per_stage=settings["video_steps"],
                    video_guidance_scale=settings["video_guidance_scale"],
                    kv_cache=settings["kv_cache"],
                    init=init_path,
                    init_frames=0 if init is None else int(init.shape[2]),
                )
            records.append(record)
    with open(out / "samples.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    save_frame_strip(torch.cat(strips)[:16], out / "strip.png")
    log.info(f"Wrote {len(records)} videos, samples.jsonl and strip.png to {out}")
    return out


@hydra.main(version_base="1.3", config_path="../configs", config_name="sample.yaml")
def main(cfg: DictConfig) -> None:
    OmegaConf.resolve(cfg)
    sample(cfg)


if __name__ == "__main__":
    main()
