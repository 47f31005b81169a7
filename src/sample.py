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

from src.data.video_io import read_video, write_mp4  # noqa: E402
from src.models.checkpoint import load_module, sha256_file  # noqa: E402
from src.utils import RankedLogger  # noqa: E402
from src.utils.visualize import save_frame_strip  # noqa: E402

log = RankedLogger(__name__)


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
    prompts = read_prompts(cfg.prompts_file)
    module = load_module(cfg.ckpt_path, cfg.device)
    sha = sha256_file(cfg.ckpt_path)
    hp = module.hparams
    steps = list(cfg.steps) if cfg.steps is not None else list(hp.sampling["steps"])
    w = cfg.guidance_scale if cfg.guidance_scale is not None else hp.sampling["guidance_scale"]
    neg = (
        cfg.negative_prompt if cfg.negative_prompt is not None else hp.sampling["negative_prompt"]
    )
    init, init_path = read_init(cfg)
    extra = {
        "num_frames": cfg.get("num_frames"),
        "init_video": init,
        "video_steps": cfg.get("video_steps"),
        "video_guidance_scale": cfg.get("video_guidance_scale"),
        "kv_cache": cfg.get("kv_cache"),
    }
    if extra["video_steps"] is not None:
        extra["video_steps"] = list(extra["video_steps"])
    ar = module.autoregressive
    smp = hp.sampling
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records, strips = [], []
    for start in range(0, len(prompts), cfg.batch_size):
        chunk = prompts[start : start + cfg.batch_size]
        # seed of prompt i is seed + i: the same video whatever the batch size
        videos = module.generate(
            chunk,
            seed=cfg.seed + start,
            steps=steps,
            guidance_scale=w,
            negative_prompt=neg,
            **extra,
        )
        strips.append(videos[:, :, :])
        for j, (prompt, video) in enumerate(zip(chunk, videos)):
            i = start + j
            write_mp4(out / f"{i:04d}.mp4", video, fps=hp.video["fps"])
            records.append(
                {
                    "file": f"{i:04d}.mp4",
                    "prompt": prompt,
                    "seed": cfg.seed + i,
                    "steps_per_stage": steps,
                    "guidance_scale": w,
                    "negative_prompt": neg,
                    "frames": int(video.shape[1]),
                    "height": int(video.shape[2]),
                    "width": int(video.shape[3]),
                    "fps": hp.video["fps"],
                    "ckpt_path": str(cfg.ckpt_path),
                    "ckpt_sha256": sha,
                    "temporal": dict(module.temporal),
                }
            )
            if ar:
                vs = extra["video_steps"] or list(smp.get("video_steps", steps))
                vg = extra["video_guidance_scale"]
                records[-1].update(
                    video_steps_per_stage=vs,
                    video_guidance_scale=smp.get("video_guidance_scale", w) if vg is None else vg,
                    kv_cache=bool(
                        smp.get("kv_cache", False)
                        if extra["kv_cache"] is None
                        else extra["kv_cache"]
                    ),
                    init=init_path,
                    init_frames=0 if init is None else int(init.shape[2]),
                )
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
