"""Check a digits VAE export: reconstruction PSNR and whether colour, motion and position survive.

    python scripts/vae_check.py checkpoints/vae_digits.safetensors --data-dir data/shards/digits

Encodes held-out clips (posterior mean), decodes them, and reports PSNR, the model-free colour
and direction accuracy of the reconstructions against the captions (src/eval/digits_metrics.py;
ground truth scores 1.0), the mean foreground-centroid error in pixels, and the PSNR of tiled
and chunked encode/decode against the plain path. Saves a strip (originals above
reconstructions) next to the export.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from src.data.webvideo_datamodule import WebVideoDataModule
from src.eval.digits_metrics import centroids, score_video
from src.models.vae.frozen import CausalVideoAutoencoder
from src.utils.visualize import save_frame_strip, to_uint8_frames


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(4.0 / (a - b).pow(2).mean()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--data-dir", default="data/shards/digits")
    ap.add_argument("--batches", type=int, default=8)
    args = ap.parse_args()
    ae = CausalVideoAutoencoder(checkpoint=args.checkpoint)
    tiled = CausalVideoAutoencoder(checkpoint=args.checkpoint, tile=32, tile_overlap=0.25)
    chunked = CausalVideoAutoencoder(checkpoint=args.checkpoint, chunk_frames=4, chunk_latents=1)
    dm = WebVideoDataModule(args.data_dir, batch_size=8, val_batches=args.batches)
    dm.setup("validate")
    stats = {"color_acc": [], "direction_acc": []}
    errs, psnrs, psnr_tiled, psnr_chunked, first = [], [], [], [], None
    for batch in dm.val_dataloader():
        x = batch["video"]
        z = ae.encode(x)
        rec = ae.decode(z)
        psnrs.append(psnr(rec, x))
        psnr_tiled.append(psnr(tiled.decode(tiled.encode(x)), rec))
        psnr_chunked.append(psnr(chunked.decode(chunked.encode(x)), rec))
        for v, r, cap in zip(x, rec, batch["caption"]):
            fr, fx = to_uint8_frames(r), to_uint8_frames(v)
            for k, val in score_video(fr, cap).items():
                stats[k].append(val)
            errs.append(float(np.nanmean(np.abs(centroids(fr) - centroids(fx)))))
        if first is None:
            first = torch.stack([x[:6], rec[:6]], 1).flatten(0, 1)
    n = len(errs)
    print(f"{n} held-out clips")
    print(f"PSNR {sum(psnrs) / len(psnrs):.2f} dB")
    for k, v in stats.items():
        print(f"{k} {sum(v) / len(v):.3f} (ground truth 1.000)")
    print(f"centroid error {np.nanmean(errs):.2f} px (frames where both have a digit)")
    print(f"tiled (32 px tiles, 1/4 overlap) vs plain: {sum(psnr_tiled) / len(psnr_tiled):.2f} dB")
    print(f"chunked vs plain: {sum(psnr_chunked) / len(psnr_chunked):.2f} dB")
    out = Path(args.checkpoint).with_suffix(".recon.png")
    save_frame_strip(first, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
