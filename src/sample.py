"""Sample videos from a checkpoint.

python src/sample.py ckpt_path=PATH prompts_file=FILE out_dir=DIR [steps=[8,8,8]] [seed=0]
FILE: .txt (one prompt a line) or .jsonl (a "prompt" field a line). Writes DIR/0000.mp4, ...
in prompt order and DIR/samples.jsonl (prompt, seed, steps per stage, guidance, frames, fps,
checkpoint sha256).
"""

from __future__ import annotations

import json
from pathlib import Path

import hydra
import rootutils
import torch
from omegaconf import DictConfig, OmegaConf

rootutils.setup_root(__file__, indicator=".project-root", pythonpath=True)

from src.data.video_io import write_mp4  # noqa: E402
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
    lines = [ln for ln in p.read_text().splitlines() if ln.strip()]
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
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records, strips = [], []
    for start in range(0, len(prompts), cfg.batch_size):
        chunk = prompts[start : start + cfg.batch_size]
        # seed of prompt i is seed + i: the same video whatever the batch size
        videos = module.generate(
            chunk, seed=cfg.seed + start, steps=steps, guidance_scale=w, negative_prompt=neg
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
                }
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
