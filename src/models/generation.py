"""The one generation path: resolve sampling settings, encode init frames, generate latents
with classifier-free guidance, decode, and write mp4s with their records. Used by
`PyramidFlowModule.generate*`, `src/sample.py`, `make eval` and the sample-video callback.

Settings resolve once, here: an explicit argument wins, else the checkpoint's `sampling`
hyperparameters (configs/sampling/*.yaml). Autoregressive models generate frame by frame
(paper §3.3): frame 0 with `steps` / `guidance_scale` (image generation), later frames with
`video_steps` / `video_guidance_scale`, optionally continuing `init_video` (one frame is
image-to-video) and reusing history keys/values (`kv_cache`, models trained with
temporal.history_timestep=clean).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from src.data.text_features import TextFeatures
from src.data.video_io import write_mp4
from src.sampling.autoregressive import AutoregressiveSampler
from src.sampling.guidance import cfg_combine, guided_velocity
from src.sampling.pyramid_sampler import PyramidSampler


@contextlib.contextmanager
def placed(part, device, offload: bool):
    """Model offload: with `offload`, `part` (the text encoder, the DiT or the autoencoder) is
    moved to `device` for the block and back to the CPU after it, so only one of them occupies
    the accelerator at a time. Without it, everything already lives on `device`."""
    if not offload or part is None:
        yield
        return
    part.to(device)
    try:
        yield
    finally:
        part.to("cpu")
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()


def autocast(device, dtype: torch.dtype | None):
    """bf16/fp16 autocast of the DiT's sampling on `device` (None: the weights' precision)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


# the keys resolve_settings takes (explicit values over the checkpoint's)
SETTINGS = (
    "steps",
    "guidance_scale",
    "negative_prompt",
    "video_steps",
    "video_guidance_scale",
    "kv_cache",
)


def resolve_settings(sampling: dict, autoregressive: bool, **given) -> dict:
    """Sampling settings: explicit values (not None) over the checkpoint's `sampling` dict."""

    def pick(key, default=None):
        return given[key] if given.get(key) is not None else sampling.get(key, default)

    out = {
        "steps": list(pick("steps")),
        "guidance_scale": float(pick("guidance_scale")),
        "negative_prompt": pick("negative_prompt", ""),
    }
    if autoregressive:
        out["video_steps"] = list(pick("video_steps", out["steps"]))
        out["video_guidance_scale"] = float(pick("video_guidance_scale", out["guidance_scale"]))
        out["kv_cache"] = bool(pick("kv_cache", False))
    return out


def latent_shape(module, num_frames: int | None) -> tuple[int, ...]:
    """Latent shape (C, t, h, w) for `num_frames` video frames (None: the trained clip)."""
    v = module.hparams.video
    if num_frames is None:
        return module.latent_shape
    if num_frames > v["num_frames"]:
        raise ValueError(
            f"num_frames={num_frames} exceeds the {v['num_frames']} frames "
            f"({module.latent_shape[1]} latent frames) this model was trained on, so later "
            f"frame positions were never trained; fix: num_frames<={v['num_frames']}"
        )
    return module.autoencoder.latent_shape(num_frames, v["height"], v["width"])


@torch.no_grad()
def encode_init(
    module, video: torch.Tensor, latent_frames: int, device=None, offload: bool = False
) -> torch.Tensor:
    """Clean normalised latents of a given image/clip (B, 3, n, H, W) in [-1, 1]."""
    v = module.hparams.video
    if video.ndim != 5 or video.shape[1] != 3:
        raise ValueError(
            f"init image/video has shape {tuple(video.shape)}; expected (B, 3, frames, H, W) "
            "RGB in [-1, 1]"
        )
    if video.shape[-2:] != (v["height"], v["width"]):
        raise ValueError(
            f"init image/video is {video.shape[-1]}x{video.shape[-2]} (WxH) but the model "
            f"generates {v['width']}x{v['height']}; fix: resize or crop it to that size"
        )
    ft = module.autoencoder.temporal_factor
    if (video.shape[2] - 1) % ft:
        raise ValueError(
            f"the init video has {video.shape[2]} frames; the causal autoencoder needs "
            f"1 + k*{ft} (the first frame alone, then groups of {ft}); fix: trim it to "
            f"{1 + (video.shape[2] - 1) // ft * ft} frames"
        )
    device = module.device if device is None else device
    with placed(module.autoencoder, device, offload):
        lat = module.autoencoder.encode(video.float().to(device), sample=False)
    if lat.shape[2] >= latent_frames:
        raise ValueError(
            f"the init video has {video.shape[2]} frames ({lat.shape[2]} latent frames), "
            f"leaving none of the {latent_frames} latent frames to generate; fix: a "
            "shorter init video or more num_frames"
        )
    return lat


def frame_velocity_factory(
    net: nn.Module,
    cond: TextFeatures,
    unc: TextFeatures,
    w_image: float,
    w_video: float,
    kv_cache: bool,
):
    """make_velocity(frame, stage, history) for `AutoregressiveSampler`: classifier-free
    guidance with w_image on frame 0 and w_video later (off when <= 0), and with `kv_cache`
    the text + history keys/values computed once per (frame, stage) and reused by every step."""

    def make(u: int, stage: int, hist: list[torch.Tensor]):
        w = w_image if u == 0 else w_video
        feats = TextFeatures.cat([unc, cond]) if w > 0 else cond
        rep = 2 if w > 0 else 1
        hist = [h.repeat(rep, 1, 1, 1, 1) for h in hist]
        if kv_cache and hist:
            grid = tuple(hist[-1].shape[3:])  # frame u-1 is always at the stage's resolution
            kv = net.encode_prefix(hist, feats.tokens, feats.mask, feats.pooled, grid)
            run = lambda z, t: net.forward_cached(z, t, kv)
        else:
            run = lambda z, t: net(
                z, t, feats.tokens, feats.mask, feats.pooled, history=hist, causal=True
            )
        if rep == 1:
            return run

        def guided(z, t):
            v_u, v_c = run(torch.cat([z, z]), torch.cat([t, t])).chunk(2)
            return cfg_combine(v_u, v_c, w)

        return guided

    return make


@torch.no_grad()
def start_noise(shape: tuple[int, ...], seed: int, num: int) -> torch.Tensor:
    """(num, *shape) start noise on the CPU, video i drawn from seed + i: a video depends only
    on its own seed, not on its batch."""
    return torch.stack(
        [torch.randn(shape, generator=torch.Generator().manual_seed(seed + i)) for i in range(num)]
    )


def jump_generators(seed: int, num: int, device=None) -> list[torch.Generator]:
    """One generator per video (seed + i + 10,007) for the pyramid's corrective jump noise, so
    a video does not depend on its batch either."""
    device = torch.device("cpu") if device is None else device
    return [torch.Generator(device=device).manual_seed(seed + i + 10_007) for i in range(num)]


def generate_latents(
    module,
    prompts: list[str],
    seed: int = 0,
    num_frames: int | None = None,
    init_video: torch.Tensor | None = None,
    device=None,
    offload: bool = False,
    dtype: torch.dtype | None = None,
    **given,
) -> torch.Tensor:
    """Latents (B, C, t, h, w) for `prompts`; the noise of prompt i comes from seed + i, so a
    video does not depend on its batch. `given`: steps, guidance_scale, negative_prompt and,
    for autoregressive models, video_steps, video_guidance_scale, kv_cache (None: checkpoint).

    device: where to run (default: the module's); offload: the module stays on the CPU and the
    text encoder, DiT and autoencoder visit `device` in turn (see `placed`); dtype: autocast
    precision of the DiT (e.g. torch.bfloat16 for bf16 weights)."""
    hp, ar = module.hparams, module.autoregressive
    if not ar:
        extra = {
            "init_image/init_video": init_video is not None,
            "video_steps": given.get("video_steps") is not None,
            "video_guidance_scale": given.get("video_guidance_scale") is not None,
            "kv_cache": bool(given.get("kv_cache")),
        }
        if any(extra.values()):
            names = ", ".join(k for k, v in extra.items() if v)
            raise ValueError(
                f"{names} need an autoregressive model (temporal=autoregressive); this one was "
                f"trained with temporal.mode={module.temporal['mode']}; fix: drop them"
            )
    s = resolve_settings(hp.sampling, ar, **given)
    shape = latent_shape(module, num_frames)
    device = module.device if device is None else torch.device(device)
    noise = start_noise(module.latent_shape, seed, len(prompts))
    noise = noise[:, :, : shape[1]].to(device)  # a shorter video is a prefix of the longer one
    suffix = hp.sampling.get("prompt_suffix", "")
    with placed(module.conditioner.encoder, device, offload):
        cond = module.conditioner.encode([p + suffix for p in prompts], device)
        unc = module.conditioner.encode([s["negative_prompt"]] * len(prompts), device)
    init = None
    if init_video is not None:
        if init_video.shape[0] not in (1, len(prompts)):
            raise ValueError(
                f"init video batch {init_video.shape[0]} must be 1 (shared) or one per "
                f"prompt ({len(prompts)})"
            )
        init = encode_init(module, init_video, shape[1], device, offload)
        init = init.expand(len(prompts), -1, -1, -1, -1)
    gens = jump_generators(seed, len(prompts), device)
    grid = hp.sampling.get("ratio_grid", "uniform")
    net = module.net
    was_training = net.training
    net.eval()
    with placed(net, device, offload), autocast(device, dtype):
        try:
            return _sample(module, net, s, ar, noise, cond, unc, gens, grid, init)
        finally:
            net.train(was_training)


def _sample(module, net, s: dict, ar: bool, noise, cond, unc, gens, grid, init) -> torch.Tensor:
    """Run the pyramid (full-sequence) or the autoregressive sampler with guidance."""
    w = s["guidance_scale"]
    if not ar:
        both = TextFeatures.cat([unc, cond])
        if w > 0:
            fn = guided_velocity(
                lambda z, t, st: net(z, t, both.tokens, both.mask, both.pooled), w
            )
        else:
            fn = lambda z, t, st: net(z, t, cond.tokens, cond.mask, cond.pooled)
        return PyramidSampler(module.schedule, s["steps"], grid).sample(noise, fn, gens)
    if s["kv_cache"] and net.history_timestep != "clean":
        raise ValueError(
            "kv_cache=true needs a model trained with temporal.history_timestep=clean, "
            f"but this one used {net.history_timestep!r}; fix: kv_cache=false"
        )
    sampler = AutoregressiveSampler(
        module.schedule, s["steps"], s["video_steps"], module.temporal["compression"], grid
    )
    make = frame_velocity_factory(net, cond, unc, w, s["video_guidance_scale"], s["kv_cache"])
    return sampler.sample(noise, make, gens, init_latents=init)


@torch.no_grad()
def decode(module, latents: torch.Tensor, device=None, offload: bool = False) -> torch.Tensor:
    """Latents -> videos (B, 3, T, H, W) in [-1, 1] on the CPU, decoded on `device` (the
    autoencoder's own tiles and chunks bound its memory)."""
    device = module.device if device is None else device
    with placed(module.autoencoder, device, offload):
        return module.decode_latents(latents.to(device)).cpu()


def generate_batches(
    module, prompts: list[str], seed: int, batch_size: int, **kwargs
) -> Iterator[tuple[int, list[str], torch.Tensor, torch.Tensor]]:
    """(start, prompts, latents, videos (B, 3, T, H, W) in [-1, 1]) per batch; prompt i always
    uses seed + i, so the videos are the same whatever the batch size. kwargs: those of
    generate_latents (device and offload also apply to decoding)."""
    device, offload = kwargs.get("device"), kwargs.get("offload", False)
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        latents = generate_latents(module, chunk, seed=seed + start, **kwargs)
        yield start, chunk, latents, decode(module, latents, device, offload)


def write_videos(
    out: Path, videos: torch.Tensor, first: int, fps: int, width: int = 4
) -> list[str]:
    """Write `videos` as out/{first:0{width}d}.mp4, ...; returns the file names."""
    names = []
    for j, video in enumerate(videos):
        names.append(f"{first + j:0{width}d}.mp4")
        write_mp4(out / names[-1], video, fps=fps)
    return names
