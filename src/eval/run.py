"""`make eval`: generate a suite's videos from a checkpoint and score them, with a report that
records everything needed to reproduce the numbers.

Suites:
- digits: prompts from the digits caption grammar for held-out glyph handwriting (validation
  split); digit/colour/direction accuracy, identity consistency, persistence, background
  flicker (src/eval/digits_bench.py) and the Fréchet video distance against the ground-truth
  renders of the same prompts (src/eval/fvd.py; the report names the features used).
- vbench_mini / vbench: `{prompt}-{i}.mp4`, 5 per prompt, at the model's fps, for the pinned
  16-prompt subset (configs/prompts/vbench_mini.txt) or VBench's own prompt file
  (vbench.prompts_file); temporal flickering is scored here without weights, every other
  dimension by the `vbench` package in its own environment when vbench.run=true
  (src/eval/vbench.py, `make vbench-env`), then Quality / Semantic / Total with VBench's
  normalisation and weights — flagged incomplete when dimensions are missing.
- evalcrafter: one video per prompt of EvalCrafter's prompt700.txt (evalcrafter.prompts_file),
  named 0000.mp4 … as its pipeline expects; CLIP-Score and CLIP-Temp are computed here from a
  local CLIP directory (evalcrafter.clip_dir), the other 15 metrics are listed with the models
  they need (src/eval/evalcrafter.py) for EvalCrafter's own docker pipeline.

The report (report.json + report.md) goes next to the checkpoint, under eval/<suite>/.
"""

from __future__ import annotations

import hashlib
import json
import platform
import shutil
import time
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from src.data.video_io import read_mp4
from src.eval.blockiness import blockiness
from src.models import generation
from src.models.checkpoint import load_module
from src.utils.checkpoint_io import sha256_file
from src.utils.pylogger import RankedLogger

log = RankedLogger(__name__)
PACKAGES = (
    "torch",
    "lightning",
    "torchmetrics",
    "hydra-core",
    "numpy",
    "scikit-learn",
    "av",
    "transformers",
)
SUITES = ("digits", "vbench_mini", "vbench", "evalcrafter")


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def digits_prompts(num: int, seed: int) -> tuple[list[str], list]:
    """Canonical captions of `num` validation specs (held-out handwriting) and the specs."""
    from src.data.digits import canonical_caption, iter_specs

    specs = list(iter_specs(num, "val", seed=seed))
    return [canonical_caption(s.digit, s.color, s.direction) for s in specs], specs


def generate_suite(module, prompts: list[str], cfg: DictConfig, out: Path) -> list[dict]:
    """Write 0000.mp4 ... for the prompts (seed + i each), return the per-video records."""
    records = []
    batches = generation.generate_batches(
        module, prompts, cfg.seed, cfg.batch_size,
        steps=list(cfg.steps) if cfg.steps is not None else None,
        guidance_scale=cfg.guidance_scale,
    )  # fmt: skip
    for start, chunk, latents, videos in batches:
        # latent-block artefacts of the stage jumps (corrective-noise ablation): 2x2, 4x4
        blocks, blocks4 = blockiness(latents, 2), blockiness(latents, 4)
        names = generation.write_videos(out, videos, start, module.hparams.video["fps"])
        for j, (name, prompt) in enumerate(zip(names, chunk)):
            records.append(
                {
                    "file": name,
                    "prompt": prompt,
                    "seed": cfg.seed + start + j,
                    "blockiness": float(blocks[j]),
                    "blockiness_4": float(blocks4[j]),
                }
            )
    return records


def fvd_digits(fake: list[np.ndarray], real: list[np.ndarray], cfg: DictConfig) -> dict:
    """FVD between generated and ground-truth clips, with the feature set named."""
    from src.eval.fvd import FrechetVideoDistance

    metric = FrechetVideoDistance(features=cfg.fvd.features, i3d_path=cfg.fvd.i3d_path)

    def batch(vs: list[np.ndarray]) -> torch.Tensor:  # (B, 3, T, H, W) in [-1, 1]
        return torch.from_numpy(np.stack(vs)).permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0

    for i in range(0, len(fake), 16):
        f, r = batch(fake[i : i + 16]), batch(real[i : i + 16])
        metric.update(f, real=False)
        metric.update(r, real=True)
    return {"fvd": float(metric.compute()), "fvd_features": metric.feature_name}


def evaluate(cfg: DictConfig) -> dict:
    if cfg.suite not in SUITES:
        raise ValueError(f"suite={cfg.suite} is unknown; fix: one of {list(SUITES)}")
    t0 = time.perf_counter()
    module = load_module(cfg.ckpt_path, cfg.device)
    out = Path(cfg.out_dir or Path(cfg.ckpt_path).parent.parent / "eval" / cfg.suite)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.suite.startswith("vbench"):
        scores, records, prompt_file, source = vbench_suite(module, cfg, out)
    elif cfg.suite == "evalcrafter":
        scores, records, prompt_file, source = evalcrafter_suite(module, cfg, out)
    else:
        scores, records, prompt_file, source = digits_suite(module, cfg, out)
    return write_report(module, cfg, out, scores, records, prompt_file, source, t0)


def vbench_suite(module, cfg: DictConfig, out: Path):
    from src.eval import vbench

    prompt_file = Path(
        vbench.VBENCH_MINI if cfg.suite == "vbench_mini" else (cfg.vbench.prompts_file or "")
    )
    if not prompt_file.is_file():
        raise FileNotFoundError(
            f"vbench.prompts_file={cfg.vbench.prompts_file} does not exist; fix: VBench's "
            "prompts/all_dimension.txt (or a per-dimension suite) from its repository"
        )
    prompts = vbench.read_prompt_file(prompt_file)
    steps = list(cfg.steps) if cfg.steps is not None else None

    def generate(batch: list[str], seeds: list[int]):
        if seeds == list(range(seeds[0], seeds[0] + len(seeds))):  # seed + i per prompt
            return module.generate(
                batch, seed=seeds[0], steps=steps, guidance_scale=cfg.guidance_scale
            )
        return torch.cat(
            [
                module.generate([p], seed=s, steps=steps, guidance_scale=cfg.guidance_scale)
                for p, s in zip(batch, seeds)
            ]
        )

    videos = out / "videos"
    if cfg.vbench.run:  # fail before generating anything
        vbench.vbench_entry_point(cfg.vbench.python)
    if videos.exists():  # never score another checkpoint's (or another setting's) leftovers
        shutil.rmtree(videos)
    records = vbench.write_vbench_videos(
        generate,
        prompts,
        videos,
        per_prompt=cfg.vbench.per_prompt,
        seed=cfg.seed,
        fps=module.hparams.video["fps"],
        batch_size=cfg.batch_size,
        overwrite=True,
    )
    # local flickering has no static filter: reported on its own, never as VBench's dimension
    local = vbench.local_scores(videos)["scores"]["temporal flickering"]
    raw: dict[str, float] = {}
    if cfg.vbench.run:
        result = vbench.run_vbench(
            videos,
            out / "vbench",
            list(cfg.vbench.dimensions),
            python=cfg.vbench.python,
            mode=cfg.vbench.mode,
        )
        raw |= result["scores"]
    summary = vbench.summarize(raw)
    # group scores only when every dimension of the group is present; partial means are named
    q_ok, s_ok = not summary["missing_quality"], not summary["missing_semantic"]
    scores = {
        "quality": summary["quality"] if q_ok else None,
        "semantic": summary["semantic"] if s_ok else None,
        "total": summary["total"] if summary["complete"] else None,
        "quality_partial_mean": None if q_ok else summary["quality"],
        "complete": summary["complete"],
        "missing": summary["missing"],
        "local/temporal_flickering_unfiltered": local,
        **{f"raw/{k}": v for k, v in raw.items()},
    }
    source = f"{prompt_file.name}, {cfg.vbench.per_prompt} videos per prompt"
    return scores, records, prompt_file, source


def evalcrafter_suite(module, cfg: DictConfig, out: Path):
    from src.eval import evalcrafter

    ec = cfg.evalcrafter
    prompt_file = Path(ec.prompts_file or "").expanduser()
    prompts = evalcrafter.read_prompts(prompt_file)
    if ec.clip_dir and not Path(ec.clip_dir).expanduser().is_dir():  # fail before generating
        raise FileNotFoundError(
            f"evalcrafter.clip_dir={ec.clip_dir} does not exist; fix: a local "
            "openai/clip-vit-base-patch32 directory, or null to skip the CLIP metrics"
        )
    records = generate_suite(module, prompts, cfg, out)  # 0000.mp4 ...: EvalCrafter's naming
    result = evalcrafter.score_dir(
        out, prompts, clip_dir=ec.clip_dir, device=cfg.device, preprocess=ec.preprocess
    )
    scores = {k: result[k] for k in evalcrafter.OFFLINE_METRICS if k in result}
    scores["clip_preprocess"] = ec.preprocess if ec.clip_dir else "not computed (no clip_dir)"
    scores["not_computed"] = sorted(result["not_computed"])
    source = f"{prompt_file.name}, one video per prompt, clip_dir={ec.clip_dir}"
    return scores, records, prompt_file, source


def reference_clip(spec, frames: int, height: int, width: int) -> np.ndarray:
    """The ground truth as training saw it: the first `frames` frames, resized like the data
    pipeline, through the same mp4 encoding. uint8 (T, H, W, 3)."""
    from src.data.digits import render_video
    from src.data.pipeline import to_clip_tensor
    from src.data.video_io import mp4_bytes

    clip = to_clip_tensor(render_video(spec)[:frames], height, width)  # (3, T, H, W)
    return read_mp4(mp4_bytes(clip, fps=8))


def digits_suite(module, cfg: DictConfig, out: Path):
    if cfg.fvd.enabled and cfg.fvd.features == "i3d":  # fail before generating anything
        from src.eval.fvd import FrechetVideoDistance

        FrechetVideoDistance(features="i3d", i3d_path=cfg.fvd.i3d_path)
    prompts, specs = digits_prompts(cfg.num_videos, cfg.prompt_seed)
    prompt_file = out / "prompts.txt"
    prompt_file.write_text("\n".join(prompts) + "\n")
    records = generate_suite(module, prompts, cfg, out)
    fake = [read_mp4(out / r["file"]) for r in records]

    from src.eval.digits_bench import score_digits_video

    v = module.hparams.video
    real = [reference_clip(s, v["num_frames"], v["height"], v["width"]) for s in specs]
    rows = [score_digits_video(v, r["prompt"]) for v, r in zip(fake, records)]
    for r, s in zip(records, rows):
        r.update(s)
    scores = {k: float(np.mean([s[k] for s in rows])) for k in rows[0]}
    for key in ("blockiness", "blockiness_4"):
        scores[key] = float(np.mean([r[key] for r in records]))
    if cfg.fvd.enabled:
        scores |= fvd_digits(fake, real, cfg)
    source = f"digits grammar, validation glyphs, prompt_seed={cfg.prompt_seed}"
    return scores, records, prompt_file, source


def write_report(module, cfg, out, scores, records, prompt_file, source, t0) -> dict:
    hp = module.hparams
    sampling = hp.sampling
    report = {
        "suite": cfg.suite,
        "scores": scores,
        "videos": len(records),
        "checkpoint": {"path": str(cfg.ckpt_path), "sha256": sha256_file(cfg.ckpt_path)},
        "prompts": {
            "file": str(prompt_file),
            "sha256": hashlib.sha256(prompt_file.read_bytes()).hexdigest(),
            "source": source,
        },
        "settings": {
            "seeds": [r["seed"] for r in records],
            "steps_per_stage": list(cfg.steps) if cfg.steps is not None else sampling["steps"],
            "guidance_scale": sampling["guidance_scale"]
            if cfg.guidance_scale is None
            else cfg.guidance_scale,
            "temporal": dict(module.temporal),
            "video_steps_per_stage": sampling.get("video_steps"),
            "video_guidance_scale": sampling.get("video_guidance_scale"),
            "kv_cache": sampling.get("kv_cache", False),
            "ratio_grid": sampling.get("ratio_grid", "uniform"),
            "negative_prompt": sampling.get("negative_prompt", ""),
            "prompt_suffix": sampling.get("prompt_suffix", ""),
            "device": str(cfg.device),
            "frames": hp.video["num_frames"],
            "size": [hp.video["height"], hp.video["width"]],
            "fps": hp.video["fps"],
        },
        "packages": package_versions(),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    with open(out / "videos.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    (out / "report.md").write_text(markdown_report(report))
    log.info(f"Wrote {out / 'report.json'} and report.md ({len(records)} videos)")
    print(markdown_table(scores))
    return report


def markdown_table(scores: dict) -> str:
    lines = ["| metric | value |", "|---|---|"]
    for k, v in scores.items():
        v = ", ".join(v) if isinstance(v, list) else v
        lines.append(f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |")
    return "\n".join(lines)


def markdown_report(report: dict) -> str:
    s = report["settings"]
    return (
        f"# Evaluation: suite `{report['suite']}`\n\n{markdown_table(report['scores'])}\n\n"
        f"- checkpoint: `{report['checkpoint']['path']}` (sha256 "
        f"`{report['checkpoint']['sha256'][:16]}…`)\n"
        f"- prompts: {report['videos']} from {report['prompts']['source']} (sha256 "
        f"`{report['prompts']['sha256'][:16]}…`)\n"
        f"- seeds {s['seeds'][0]}…{s['seeds'][-1]}, steps {s['steps_per_stage']}, guidance "
        f"{s['guidance_scale']}, temporal {s['temporal']['mode']}, {s['frames']} frames "
        f"{s['size'][1]}x{s['size'][0]} at {s['fps']} fps\n"
        f"- packages: {', '.join(f'{k} {v}' for k, v in report['packages'].items())}\n"
        f"- took {report['seconds']} s\n"
    )
