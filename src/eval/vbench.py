"""VBench glue: VBench's file naming, the seed manifest, parsing its results, the model-free
temporal flickering, and a runner for the separate VBench environment. The published scoring
arithmetic (Total / Quality / Semantic) is in `src.eval.vbench_scores`.

This module never imports the ``vbench`` package. VBench 0.1.5 pins its own torch/CUDA and
``transformers==4.33.2``, which would replace this repository's torch, so it lives in its own
virtual environment (``bash scripts/vbench_env.sh`` creates ``.venv-vbench``) and is driven
through its command line. Temporal flickering needs no network here (VBench's leaderboard
number also applies a RAFT static filter first, see :func:`vbench_commands`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from src.eval.vbench_scores import (
    CUSTOM_INPUT_DIMENSIONS,
    DIMENSION_MODELS,
    MODES,
    canonical_dimension,
    cli_dimension,
    format_summary,
    summarize,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_VBENCH_PYTHON = REPO_ROOT / ".venv-vbench" / "bin" / "python"
ENV_HINT = "run `bash scripts/vbench_env.sh` (or `make vbench-env`) to create it"
# pinned prompt subset for quick, non-leaderboard checks; its sha256 is checked by the tests
VBENCH_MINI = REPO_ROOT / "configs" / "prompts" / "vbench_mini.txt"
VBENCH_MINI_SHA256 = "e54c20cd2575efe54b70e6a86be65c36277980fc66bcab1c7921819230689df8"


def read_prompt_file(path: str | os.PathLike) -> list[str]:
    """One prompt a line, verbatim (only the line ending is removed: VBench matches file names
    to its prompts exactly); blank lines and lines starting with '#' are skipped."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"prompt file not found: {p}")
    prompts = [
        ln
        for ln in p.read_text(encoding="utf-8").splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    if not prompts:
        raise ValueError(f"prompt file {p} holds no prompts")
    return prompts


def vbench_filename(prompt: str, index: int) -> str:
    """``f"{prompt}-{index}.mp4"``, the name VBench derives the prompt from (text verbatim)."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"prompt must be a non-empty string, got {prompt!r}")
    if "/" in prompt or "\0" in prompt:
        raise ValueError(
            f"prompt {prompt!r} contains '/' or NUL and cannot be a file name; VBench names each "
            "video '{prompt}-{index}.mp4', so such a prompt cannot be evaluated from file names"
        )
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or index < 0:
        raise ValueError(f"index must be a non-negative int, got {index!r}")
    name = f"{prompt}-{int(index)}.mp4"
    if len(name.encode("utf-8")) > 255:
        raise ValueError(f"file name for prompt {prompt[:40]!r}... exceeds 255 bytes")
    return name


def videos_per_prompt(dimension: str) -> int:
    """VBench's sample count: 25 videos per prompt for temporal flickering, else 5."""
    return 25 if canonical_dimension(dimension) == "temporal flickering" else 5


def _frames_uint8(video: Any) -> np.ndarray:
    """uint8 (T, H, W, 3), or float (3, T, H, W) in [-1, 1] (numpy or torch) -> uint8 (T,H,W,3)."""
    from src.data.video_io import to_uint8_frames

    if isinstance(video, np.ndarray) and video.dtype != np.uint8:
        import torch

        video = torch.from_numpy(np.ascontiguousarray(video, dtype=np.float32))
    return to_uint8_frames(video)


def write_vbench_videos(
    generate_fn: Callable[[list[str], list[int]], Sequence[Any]],
    prompts: Iterable[str],
    out_dir: str | os.PathLike,
    per_prompt: int = 5,
    seed: int = 0,
    fps: float = 24.0,
    batch_size: int | None = None,
    overwrite: bool = False,
) -> list[dict[str, Any]]:
    """Sample ``per_prompt`` videos of every prompt as ``{prompt}-{i}.mp4`` for VBench.

    Args:
        generate_fn: ``(prompts, seeds) -> videos``, one video per (prompt, seed) pair, each a
            uint8 array ``(T, H, W, 3)`` or a float array/tensor ``(3, T, H, W)`` in [-1, 1]
            (a batched array works too). The caller wires the model.
        prompts: the prompts, verbatim; repeated prompts are sampled once (VBench's
            all_dimension.txt lists a few prompts twice).
        out_dir: folder for the mp4s and ``vbench_manifest.jsonl`` (file, prompt, index, seed).
        per_prompt: videos per prompt (5; 25 for the temporal flickering suite).
        seed: video ``i`` of prompt number ``p`` gets seed ``seed + p * per_prompt + i``.
        fps: frame rate written into the files; Pyramid Flow's published VBench numbers used
            24 fps (Pyramid-Flow#245), pass the model's own rate when it differs.
        batch_size: (prompt, seed) pairs per generate_fn call (default ``per_prompt``).
        overwrite: regenerate files that already exist (default: keep them, so an interrupted
            run resumes; seeds are deterministic so their manifest rows are unchanged).

    Returns:
        The manifest rows, in order.
    """
    from src.data.video_io import write_mp4

    if per_prompt < 1:
        raise ValueError(f"per_prompt must be >= 1, got {per_prompt}")
    unique: list[str] = []
    for p in prompts:
        if p not in unique:
            unique.append(p)
        else:
            warnings.warn(f"prompt {p!r} repeated; sampled once", stacklevel=2)
    if not unique:
        raise ValueError("no prompts to sample")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    todo = [
        {
            "file": vbench_filename(p, i),  # validates every name before any sampling
            "prompt": p,
            "index": i,
            "seed": seed + k * per_prompt + i,
        }
        for k, p in enumerate(unique)
        for i in range(per_prompt)
    ]
    pending = [r for r in todo if overwrite or not (out / r["file"]).is_file()]
    bs = batch_size or per_prompt
    for start in range(0, len(pending), bs):
        chunk = pending[start : start + bs]
        videos = generate_fn([r["prompt"] for r in chunk], [r["seed"] for r in chunk])
        if len(videos) != len(chunk):
            raise ValueError(f"generate_fn returned {len(videos)} videos for {len(chunk)} prompts")
        for row, video in zip(chunk, videos):
            write_mp4(out / row["file"], _frames_uint8(video), fps=fps)
    rows = [dict(r, fps=fps) for r in todo]
    with open(out / "vbench_manifest.jsonl", "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return rows


# ---------------------------------------------------------------------------------------------
# VBench results
# ---------------------------------------------------------------------------------------------


def _aggregate(name: str, value: Any) -> float:
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError(f"VBench result for {name!r} is an empty list")
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"VBench result for {name!r} is not a number: {value!r}")
    return float(value)


def read_vbench_results(path: str | os.PathLike) -> dict[str, float]:
    """Parse VBench's ``*_eval_results.json`` into ``{dimension: raw score}``.

    The file maps ``"dimension_name"`` to ``[aggregate, [per-video dicts...]]`` (or a bare
    number). ``path`` may also be a folder: all its ``*_eval_results.json`` are merged in name
    order (VBench names them ``results_<time>_eval_results.json``, so later runs win). Known
    dimensions come back in canonical form (``"subject consistency"``), other keys unchanged.
    """
    p = Path(path)
    if p.is_dir():
        files = sorted(p.glob("*_eval_results.json"))
        if not files:
            raise FileNotFoundError(f"no *_eval_results.json in {p}")
    elif p.is_file():
        files = [p]
    else:
        raise FileNotFoundError(f"VBench results not found: {p}")
    out: dict[str, float] = {}
    for f in files:
        data = json.loads(f.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError(f"{f}: expected a JSON object of dimension -> result")
        for name, value in data.items():
            try:
                key = canonical_dimension(name)
            except ValueError:
                key = name
            out[key] = _aggregate(name, value)
    return out


# ---------------------------------------------------------------------------------------------
# Model-free temporal flickering
# ---------------------------------------------------------------------------------------------


def temporal_flickering(frames: np.ndarray) -> float:
    """VBench's temporal flickering of one video: ``(255 - MAE) / 255``, where MAE is the mean
    over consecutive frame pairs of the mean absolute pixel difference (1 = no flicker).

    VBench scores only videos that pass its RAFT static filter (static scenes, where any change
    is flicker); on moving content this number also counts motion.
    """
    video = np.asarray(frames)
    if video.dtype != np.uint8 or video.ndim != 4 or video.shape[-1] != 3:
        raise ValueError(
            f"frames must be uint8 (T, H, W, 3), got {video.dtype} {tuple(video.shape)}"
        )
    if video.shape[0] < 2:
        raise ValueError(f"temporal flickering needs at least 2 frames, got {video.shape[0]}")
    maes = [
        np.abs(video[t + 1].astype(np.int16) - video[t].astype(np.int16)).mean()
        for t in range(video.shape[0] - 1)
    ]
    return (255.0 - float(np.mean(maes))) / 255.0


def local_scores(video_dir: str | os.PathLike) -> dict[str, Any]:
    """Temporal flickering of every mp4 in ``video_dir``, without VBench or any weights.

    Returns ``{"scores": {"temporal flickering": mean}, "per_video": {file: score},
    "n_videos": N, "static_filter_applied": False, "needs_vbench": {dim: model}}``; every
    dimension in ``needs_vbench`` (all but temporal flickering) needs VBench's pretrained models
    (:func:`run_vbench`). Frames are decoded with PyAV, VBench uses OpenCV: the two decoders
    may differ slightly.
    """
    from src.data.video_io import read_mp4

    d = Path(video_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"video folder not found: {d}")
    files = sorted(d.glob("*.mp4"))
    if not files:
        raise FileNotFoundError(f"no .mp4 files in {d}")
    per_video = {f.name: temporal_flickering(read_mp4(f)) for f in files}
    return {
        "scores": {"temporal flickering": float(np.mean(list(per_video.values())))},
        "per_video": per_video,
        "n_videos": len(files),
        "static_filter_applied": False,
        "needs_vbench": {k: v for k, v in DIMENSION_MODELS.items() if k != "temporal flickering"},
    }


# ---------------------------------------------------------------------------------------------
# Running VBench in its own environment
# ---------------------------------------------------------------------------------------------

_SHELL_SAFE = re.compile(r"^[\w./+:@%=,-]+$")


def _shell_safe(path: str, what: str) -> str:
    # VBench's CLI re-launches itself through a shell with this argument unquoted
    if not _SHELL_SAFE.match(path):
        raise ValueError(
            f"{what} {path!r} must not contain spaces or shell characters (VBench passes it "
            "through an unquoted shell command)"
        )
    return path


def vbench_commands(
    videos_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    dimensions: Sequence[str],
    vbench_bin: str | os.PathLike,
    mode: str = "custom_input",
    ngpus: int = 1,
) -> list[list[str]]:
    """The ``vbench`` command lines for ``dimensions``, one ``evaluate`` call per dimension
    (VBench's CLI takes a single ``--dimension``). Pure: nothing is run or checked on disk.

    In ``vbench_standard`` mode temporal flickering is preceded by ``vbench static_filter``
    (RAFT keeps at most 5 static videos per prompt of the 25) and evaluated on the filtered
    copies under ``out_dir/static_filter/filtered_videos``, as VBench prescribes.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not dimensions:
        raise ValueError("no dimensions given")
    dims = [canonical_dimension(d) for d in dimensions]
    if mode == "custom_input":
        bad = [d for d in dims if d not in CUSTOM_INPUT_DIMENSIONS]
        if bad:
            raise ValueError(
                f"VBench's custom_input mode supports only {list(CUSTOM_INPUT_DIMENSIONS)}; "
                f"{bad} need mode='vbench_standard' and videos of VBench's own prompts"
            )
    videos, out = str(videos_dir), _shell_safe(str(out_dir), "out_dir")
    if any(c in videos for c in '"$`\\'):
        raise ValueError(f'videos_dir {videos!r} must not contain ", $, ` or \\')
    exe = str(vbench_bin)
    cmds: list[list[str]] = []
    for dim in dict.fromkeys(dims):
        src = videos
        if dim == "temporal flickering" and mode == "vbench_standard":
            filt = f"{out}/static_filter"
            cmds.append([exe, "static_filter", "--videos_path", videos, "--result_path", filt])
            src = f"{filt}/filtered_videos"
        cmds.append(
            [
                exe,
                "evaluate",
                "--videos_path",
                src,
                "--dimension",
                cli_dimension(dim),
                "--mode",
                mode,
                "--output_path",
                out,
                "--ngpus",
                str(int(ngpus)),
            ]
        )
    return cmds


def vbench_entry_point(python: str | os.PathLike = DEFAULT_VBENCH_PYTHON) -> Path:
    """The ``vbench`` script next to the environment's interpreter; FileNotFoundError if the
    environment is missing."""
    py = Path(python)
    exe = py.parent / "vbench"
    for p in (py, exe):
        if not p.exists():
            raise FileNotFoundError(f"VBench environment not found ({p} is missing); {ENV_HINT}")
    return exe


def run_vbench(
    videos_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    dimensions: Sequence[str],
    python: str | os.PathLike = DEFAULT_VBENCH_PYTHON,
    mode: str = "custom_input",
    ngpus: int = 1,
) -> dict[str, Any]:
    """Evaluate ``dimensions`` of the videos in ``videos_dir`` with VBench (needs a CUDA GPU
    and VBench's pretrained models, which VBench downloads on first use).

    Returns ``{"commands", "results_files", "scores", "summary"}`` for the result files this
    call wrote. Raises FileNotFoundError when the environment is missing and
    CalledProcessError when a VBench command fails.
    """
    exe = vbench_entry_point(python)
    videos = Path(videos_dir)
    if not videos.is_dir():
        raise FileNotFoundError(f"videos folder not found: {videos}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cmds = vbench_commands(videos, out, dimensions, exe, mode=mode, ngpus=ngpus)
    env = dict(os.environ)
    # VBench's CLI runs `python -m torch.distributed.run ...` through the shell: put the
    # environment's bin first so that `python` is its interpreter, and keep our repo off its path
    env["PATH"] = f"{exe.parent}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(exe.parent.parent)
    env.pop("PYTHONPATH", None)
    before = set(out.glob("*_eval_results.json"))
    for cmd in cmds:
        subprocess.run(cmd, check=True, env=env)
    new = sorted(set(out.glob("*_eval_results.json")) - before)
    scores: dict[str, float] = {}
    for f in new:
        scores.update(read_vbench_results(f))
    return {
        "commands": cmds,
        "results_files": [str(f) for f in new],
        "scores": scores,
        "summary": summarize(scores),
    }


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m src.eval.vbench", description="VBench scoring helpers"
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("score", help="Total/Quality/Semantic of *_eval_results.json (file/dir)")
    p.add_argument("results")
    p = sub.add_parser("local", help="model-free temporal flickering of a folder of mp4s")
    p.add_argument("videos")
    args = parser.parse_args(argv)
    if args.cmd == "score":
        summary = summarize(read_vbench_results(args.results))
        print(format_summary(summary))
    else:
        res = local_scores(args.videos)
        print(
            f"temporal flickering {100 * res['scores']['temporal flickering']:.2f} over "
            f"{res['n_videos']} videos (no static filter); the other dimensions need VBench's "
            "models: " + "; ".join(f"{k}: {v}" for k, v in res["needs_vbench"].items())
        )


if __name__ == "__main__":
    main()
