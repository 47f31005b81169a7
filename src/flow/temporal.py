"""Temporal pyramid: which resolution each history frame has, and how history is built.

Pure tensor code (paper §3.3, Eqs. 16-17). The unit is one latent frame. When frame u is
generated (or trained) at pyramid stage i, the frames before it form its history, oldest first:

    frame u-1 at stage i, frame u-2 at stage i-(c-1), frame u-3 at stage i-2(c-1), ...,

clipped at stage 0, where c = `compression`. c = 2 is the paper's rule (one level coarser per
frame of distance); c = 1 keeps all history at the current resolution (uncompressed); larger c
compresses faster. History latents are the spatial pyramid (2x2 average pools) of the *clean*
full-resolution latents, never intermediate stage outputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def check_compression(compression: int) -> int:
    c = int(compression)
    if c < 1 or c != compression:
        raise ValueError(
            f"temporal.compression={compression} must be an integer >= 1; fix: 2 (the paper's "
            "rule), 1 (no compression) or a larger value to compress faster"
        )
    return c


def history_levels(frame: int, stage: int, compression: int) -> list[int]:
    """Pyramid stage of each history frame 0..frame-1 (oldest first) for frame `frame` at stage
    `stage`: [..., stage - 2(c-1), stage - (c-1), stage] clipped at 0."""
    c = check_compression(compression)
    return [max(stage - (c - 1) * (frame - 1 - j), 0) for j in range(frame)]


@dataclass(frozen=True)
class HistoryChunk:
    """Consecutive history frames at one pyramid level: frames [first, first + count)."""

    first: int
    count: int
    level: int


def history_chunks(frame: int, stage: int, compression: int) -> list[HistoryChunk]:
    """`history_levels` grouped into runs of equal level (one tensor per run), oldest first."""
    chunks: list[HistoryChunk] = []
    for j, lv in enumerate(history_levels(frame, stage, compression)):
        if chunks and chunks[-1].level == lv:
            last = chunks[-1]
            chunks[-1] = HistoryChunk(last.first, last.count + 1, lv)
        else:
            chunks.append(HistoryChunk(j, 1, lv))
    return chunks


def sequence_tokens(
    frame: int, stage: int, compression: int, full_tokens: int, num_stages: int
) -> tuple[int, int]:
    """(history tokens, current-frame tokens) when frame `frame` is at stage `stage` and one
    full-resolution latent frame has `full_tokens` video tokens (each level down has 1/4)."""

    def at(level: int) -> int:
        return full_tokens // 4 ** (num_stages - 1 - level)

    hist = sum(ch.count * at(ch.level) for ch in history_chunks(frame, stage, compression))
    return hist, at(stage)


def build_history(
    levels: list[torch.Tensor], frame: int, stage: int, compression: int
) -> list[torch.Tensor]:
    """History tensors of `frame` at `stage` from a clean latent pyramid.

    levels: `data_pyramid(latents, K)`, level l of shape (B, C, T, H / 2^(K-1-l), W / ...).
    Returns one (B, C, count, h_l, w_l) tensor per `history_chunks` run, oldest first.
    """
    return [
        levels[ch.level][:, :, ch.first : ch.first + ch.count]
        for ch in history_chunks(frame, stage, compression)
    ]


def corrupt_history(
    history: list[torch.Tensor], sigma: torch.Tensor, generator: torch.Generator | None = None
) -> list[torch.Tensor]:
    """Training-time history noise (the reference code's `corrupt_ratio` in
    `add_pyramid_noise_with_temporal_pyramid`): h <- sigma eps + (1 - sigma) h with fresh eps
    per chunk and one sigma (B,) per sample shared by all its chunks."""
    if not bool((sigma > 0).any()):  # clean history: no draw (keeps the RNG stream)
        return list(history)
    s = sigma.reshape(-1, 1, 1, 1, 1)
    out = []
    for h in history:
        eps = torch.randn(h.shape, generator=generator, dtype=h.dtype, device=h.device)
        out.append(s.to(h.dtype) * eps + (1 - s.to(h.dtype)) * h)
    return out


def frame_positions(step: int, rank: int, world_size: int, num_frames: int) -> tuple[int, int]:
    """(full-resolution column's frame, lower stages' frame) for one training step on one rank.

    Positions cycle so that consecutive (step, rank) pairs cover every frame position equally
    often whatever the number of devices (the reference's `video_sync_group` spreads positions
    over a group of ranks; this needs no group). Lower-stage columns take the complementary
    position, so a long-history full-resolution column is packed with short-history coarse
    columns and every step has about the same token count.
    """
    high = (step * world_size + rank) % num_frames
    return high, num_frames - 1 - high
