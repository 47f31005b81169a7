"""Write webdataset mp4 shards: the moving-digits world, or a folder of captioned videos.

Examples::

    python scripts/make_shards.py digits --out data/shards/digits
    python scripts/make_shards.py digits --out /tmp/d --num-train 40 --num-val 16 \\
        --samples-per-shard 8
    python scripts/make_shards.py folder --videos clips/ --captions clips/captions.csv \\
        --out data/shards/myclips --val-fraction 0.05

Output: ``<out>/<split>/<name>-<split>-%06d.tar`` (``.mp4`` + ``.txt`` + ``.json`` per sample)
and ``<out>/<split>/manifest.json``. A standalone tool, not a Hydra entry point.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

import rootutils

rootutils.setup_root(__file__, indicator=".project-root", pythonpath=True)

from src.data.shards import write_digits_shards, write_folder_shards  # noqa: E402
from src.data.video_io import DEFAULT_CRF  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="source", required=True)

    d = sub.add_parser("digits", help="render the moving-digits dataset")
    d.add_argument("--out", required=True, help="shard root; train/ and val/ go inside")
    d.add_argument("--num-train", type=int, default=4000)
    d.add_argument("--num-val", type=int, default=256)
    d.add_argument("--samples-per-shard", type=int, default=250)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--name", default="digits", help="shard and key prefix")
    d.add_argument("--canvas-size", type=int, default=64)
    d.add_argument("--scale", type=int, default=3, help="glyph upscale (8x8 -> 8*scale)")
    d.add_argument("--speed", type=int, default=2, help="pixels per frame")
    d.add_argument("--num-frames", type=int, default=17)
    d.add_argument("--fps", type=int, default=8)
    d.add_argument("--canonical-fraction", type=float, default=0.5)

    f = sub.add_parser("folder", help="shard a folder of videos with a captions CSV/jsonl")
    f.add_argument("--out", required=True, help="shard root; <split>/ goes inside")
    f.add_argument("--videos", required=True, help="folder the caption paths are relative to")
    f.add_argument(
        "--captions", required=True, help="CSV (path,caption) or jsonl (path|video, caption|text)"
    )
    f.add_argument("--samples-per-shard", type=int, default=250)
    f.add_argument("--name", default="videos", help="shard and key prefix")
    f.add_argument("--split", default="train", help="split to write when --val-fraction is 0")
    f.add_argument("--val-fraction", type=float, default=0.0, help="share of rows for val/")
    f.add_argument("--seed", type=int, default=0, help="seed of the train/val row split")
    f.add_argument("--reencode", action="store_true", help="re-encode .mp4 files too")
    f.add_argument("--default-fps", type=float, default=8.0, help="when a video has none")

    for p in (d, f):
        p.add_argument("--crf", type=int, default=DEFAULT_CRF, help="x264 quality (lower=better)")
        p.add_argument("--overwrite", action="store_true", help="replace existing shards")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return _run(args)
    except (OSError, ValueError) as exn:  # bad paths/inputs: one clear line, no traceback
        print(f"make_shards.py {args.source}: error: {exn}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    if args.source == "digits":
        manifests = write_digits_shards(
            args.out,
            num_train=args.num_train,
            num_val=args.num_val,
            samples_per_shard=args.samples_per_shard,
            seed=args.seed,
            name=args.name,
            canvas_size=args.canvas_size,
            scale=args.scale,
            speed=args.speed,
            num_frames=args.num_frames,
            fps=args.fps,
            canonical_fraction=args.canonical_fraction,
            crf=args.crf,
            overwrite=args.overwrite,
        )
        skipped: dict = {}
    else:
        result = write_folder_shards(
            args.out,
            args.videos,
            args.captions,
            samples_per_shard=args.samples_per_shard,
            name=args.name,
            split=args.split,
            val_fraction=args.val_fraction,
            seed=args.seed,
            reencode=args.reencode,
            default_fps=args.default_fps,
            crf=args.crf,
            overwrite=args.overwrite,
        )
        manifests, skipped = result["manifests"], result["skipped"]
    for split, m in manifests.items():
        where = f"{args.out}/{split}"
        print(f"{split}: {m['num_samples']} samples in {m['num_shards']} shards -> {where}")
    print(f"skipped: {json.dumps(skipped) if skipped else 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
