"""Latent normalisation statistics of a causal VAE (as the reference pipeline's
`get_vae_latent` / `decode_latent` use them), computed from data.

``z = (raw - shift) * scale`` with separate statistics for the first latent frame (the image)
and the later frames. ``shift`` is the mean and ``scale`` the inverse standard deviation of raw
posterior samples, over all channels (one number each, as in the paper) or per channel.

CLI (rewrites the export file with the statistics, keeping a backup-free atomic replace)::

    python -m src.models.vae.latent_stats checkpoints/vae_digits.safetensors \
        --data-dir data/shards/digits --batches 32
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable

import torch
from torch import Tensor

from src.models.vae.causal_vae import CausalVAE, load_vae, save_vae


@torch.no_grad()
def latent_statistics(
    vae: CausalVAE,
    videos: Iterable[Tensor],
    per_channel: bool = False,
    seed: int = 0,
) -> dict[str, Tensor]:
    """Mean and inverse std of posterior samples: first latent frame vs the rest.

    Args:
        vae: the VAE (its mode is left unchanged; encoding runs without gradients).
        videos: batches ``(B, 3, T, H, W)`` in [-1, 1] with ``T = 1 + k * f_t``, ``k >= 1``.
        per_channel: one statistic per latent channel instead of one overall.
        seed: seed of the posterior samples.

    Returns:
        ``shift_first``, ``scale_first``, ``shift_rest``, ``scale_rest``, each ``(C,)``.
    """
    g = torch.Generator().manual_seed(seed)
    dims = (0, 2, 3, 4) if per_channel else (0, 1, 2, 3, 4)
    sums = {"first": [0.0, 0.0, 0], "rest": [0.0, 0.0, 0]}  # sum, sum of squares, count
    device = next(vae.parameters()).device
    for video in videos:
        post = vae.encode(video.to(device).float())
        z = (post.mean + post.std * torch.randn(post.mean.shape, generator=g).to(device)).double()
        for part, x in (("first", z[:, :, :1]), ("rest", z[:, :, 1:])):
            if x.shape[2] == 0:
                continue
            n = x.numel() // (x.shape[1] if per_channel else 1)
            s = sums[part]
            s[0] = s[0] + x.sum(dim=dims)
            s[1] = s[1] + x.pow(2).sum(dim=dims)
            s[2] += n
    out = {}
    c = vae.latent_channels
    for part in ("first", "rest"):
        total, squares, n = sums[part]
        if n == 0:
            raise ValueError(
                f"no {part} latent frames seen: pass videos with at least 1 + f_t frames"
            )
        mean = total / n
        std = (squares / n - mean**2).clamp_min(1e-12).sqrt()
        out[f"shift_{part}"] = torch.as_tensor(mean).float().expand(c).clone()
        out[f"scale_{part}"] = (1.0 / torch.as_tensor(std)).float().expand(c).clone()
    return out


def main() -> None:
    from src.data.webvideo_datamodule import WebVideoDataModule

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("checkpoint", help="VAE export (.safetensors) to update in place")
    p.add_argument("--data-dir", required=True, help="video shard root with train/*.tar")
    p.add_argument("--frames", type=int, default=17)
    p.add_argument("--size", type=int, nargs=2, default=(64, 64), metavar=("H", "W"))
    p.add_argument("--batches", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--per-channel", action="store_true")
    args = p.parse_args()
    vae, config, _, meta = load_vae(args.checkpoint)
    dm = WebVideoDataModule(
        args.data_dir,
        batch_size=args.batch_size,
        num_frames=args.frames,
        height=args.size[0],
        width=args.size[1],
        batches_per_epoch=args.batches,
    )
    dm.setup("fit")
    stats = latent_statistics(
        vae.eval(), (b["video"] for b in dm.train_dataloader()), per_channel=args.per_channel
    )
    meta["latent_stats"] = {"batches": args.batches, "per_channel": args.per_channel}
    save_vae(args.checkpoint, vae, config, stats, meta)
    for k, v in stats.items():
        print(f"{k}: {v[: 4 if args.per_channel else 1].tolist()}")
    print(f"wrote {args.checkpoint}")


if __name__ == "__main__":
    main()
