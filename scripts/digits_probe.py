"""Screen a digits recipe at equal wall time: train in memory, then score held-out prompts.

    python scripts/digits_probe.py name=k2 minutes=8 threads=1 pyramid=stages_2
    python scripts/digits_probe.py name=k2_gs6 load=logs/probe/k2.pt gs=6   # re-score only
    python scripts/digits_probe.py name=q ckpt=<run>/checkpoints/last.ckpt decision=true
    python scripts/digits_probe.py name=o init=<run>/checkpoints/last.ckpt oracle=4 minutes=25
    python scripts/digits_probe.py name=c frames=1 bs=16 minutes=8 positions=center
    python scripts/digits_probe.py name=w_rd load=logs/probe/w.pt frames=1 redraw=true

The digits world is rendered and encoded once into memory (no mp4 decoding, no Lightning),
so a recipe change costs only its training minutes; the same PyramidFlowModule, packed loss,
sampler and digits metrics as `make train` / `make eval` are used. The LR follows a cosine
over the wall-time budget (as the trainer's budget-following schedule does). Arguments are
Hydra overrides of configs/train.yaml plus these probe keys:

    name (required), minutes (5), bs (8), threads (2), n_train (4000), frames (17),
    ema (0.995), videos (256: held-out prompts scored; 64 give a standard error of about
    0.04 near chance, too coarse to rank recipes), gs (guidance; null = config),
    load (an EMA state dict: skip training), ckpt (a training checkpoint: score it instead),
    decision (true: also measure which stage decides the digit, see `stage_decision`),
    init (a training checkpoint to continue training from: its EMA weights and fitted PCA),
    oracle (0; s > 0: a diagnostic that adds s * one-hot(digit) to the pooled caption vector
    in training and sampling, so the digit reaches adaLN as a class label would), out (logs/probe),
    positions (uniform: the digits world; a diagnostic for single frames, frames=1, that moves
    every training glyph: center = the canvas centre (a video: the middle of its trajectory),
    snapN = start snapped to multiples of N px, jitterN = the centre +- N px, both for single
    frames only; held-out prompts are still scored on the model's own placement), center_first
    (0; f > 0: the first f of the budget trains on centred copies, then `positions`: a position
    curriculum), redraw (true: also measure from which sigma the caption can still redraw a
    real held-out glyph already placed by the noisy input, see `redraw`)

Each run appends one JSON line (recipe, steps, samples, digits metrics) to <out>/results.jsonl
and saves the EMA weights and the first 16 videos (<name>.pt, <name>_videos.npy). Used for the
recipe table in docs/digits_learning.md; a screen, not a substitute for `make train`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import sys
import time
from pathlib import Path

import numpy as np
import rootutils
import torch

ROOT = rootutils.setup_root(__file__, indicator=".project-root", pythonpath=True)

from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.utils import instantiate  # noqa: E402

from src.data.digits import (  # noqa: E402
    CANVAS_SIZE,
    DIRECTIONS,
    SCALE,
    SPEED,
    DigitSpec,
    canonical_caption,
    iter_specs,
    random_caption,
    render_video,
)
from src.data.text_features import TextFeatures  # noqa: E402
from src.data.video_io import to_uint8_frames  # noqa: E402
from src.eval.digits_bench import score_videos  # noqa: E402
from src.eval.run import digits_prompts  # noqa: E402
from src.flow.losses import packed_pyramid_loss  # noqa: E402
from src.flow.schedules import sample_ratios  # noqa: E402
from src.models.checkpoint import load_module  # noqa: E402
from src.models.generation import jump_generators, start_noise  # noqa: E402
from src.sampling.guidance import guided_velocity  # noqa: E402
from src.sampling.pyramid_sampler import PyramidSampler  # noqa: E402
from src.sampling.solvers import euler_step, ratio_grid  # noqa: E402
from src.utils.optim import lr_factor, param_groups  # noqa: E402

PROBE_KEYS = {
    "name": None,
    "minutes": 5.0,
    "bs": 8,
    "threads": 2,
    "n_train": 4000,
    "frames": 17,
    "ema": 0.995,
    "videos": 256,
    "gs": None,
    "load": None,
    "ckpt": None,
    "decision": "false",
    "init": None,
    "oracle": 0.0,
    "out": "logs/probe",
    "positions": "uniform",
    "center_first": 0.0,
    "redraw": "false",
}
POSITIONS = re.compile(r"uniform|center|snap(\d+)|jitter(\d+)")


def parse(argv: list[str]) -> tuple[dict, list[str]]:
    """Split key=value arguments into probe settings and Hydra overrides."""
    probe, overrides = dict(PROBE_KEYS), []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep:
            raise SystemExit(f"argument {arg!r} is not key=value; fix: e.g. name=baseline")
        if key in PROBE_KEYS:
            default = PROBE_KEYS[key]
            probe[key] = type(default)(value) if default is not None else value
        else:
            overrides.append(arg)
    if not probe["name"]:
        raise SystemExit("name= is required (the run's label in results.jsonl)")
    if not POSITIONS.fullmatch(probe["positions"]):
        raise SystemExit(
            f"positions={probe['positions']!r} is unknown; fix: uniform, center, snapN or jitterN"
        )
    if probe["positions"] not in ("uniform", "center") and probe["frames"] != 1:
        raise SystemExit(
            f"positions={probe['positions']} moves the glyph of single images, but "
            f"frames={probe['frames']}; fix: frames=1 (videos: uniform or center)"
        )
    return probe, overrides


def place(spec: DigitSpec, positions: str, rng: np.random.Generator, frames: int = 1) -> DigitSpec:
    """Where the glyph starts in the `positions` diagnostic world (see the module doc): uniform
    keeps the spec; the others move its top-left corner (x, y) on the canvas. `center` puts
    the middle of a `frames`-frame trajectory at the canvas centre (frame 0 for an image)."""
    centre = (CANVAS_SIZE - 8 * SCALE) // 2  # a glyph is 8 x SCALE pixels square
    snap, jitter = POSITIONS.fullmatch(positions).groups()
    if positions == "uniform":
        return spec
    if positions == "center":
        half = SPEED * (frames - 1) // 2  # pixels from frame 0 to the middle frame
        xy = tuple(centre - d * half for d in DIRECTIONS[spec.direction])
    elif snap:
        xy = tuple(int(snap) * round(v / int(snap)) for v in spec.start_xy)
    else:
        xy = tuple(centre + int(d) for d in rng.integers(-int(jitter), int(jitter) + 1, size=2))
    return dataclasses.replace(spec, start_xy=xy)


def render(specs: list[DigitSpec], frames: int) -> torch.Tensor:
    """The specs' videos in the model's pixel range: (n, 3, T, H, W) in [-1, 1]."""
    video = torch.stack([torch.from_numpy(render_video(s, num_frames=frames)) for s in specs])
    return video.permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0


def render_train_set(
    module, n: int, frames: int, positions: str = "uniform"
) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    """Training videos of the digits world (same specs and caption grammar as the shards;
    glyphs moved by `place`), PCA-fitted (unless already fitted) and encoded: normalised
    latents (n, C, t, h, w), their captions and their digits (n,)."""
    rng, place_rng = np.random.default_rng(0), np.random.default_rng(1)
    specs = [place(s, positions, place_rng, frames)
             for s in iter_specs(n, "train", seed=0, num_frames=frames)]  # fmt: skip
    captions = [random_caption(s.digit, s.color, s.direction, rng) for s in specs]
    digits = [s.digit for s in specs]
    video = render(specs, frames)  # (n, 3, T, H, W)
    ae = module.autoencoder
    if getattr(ae, "requires_fit", False) and not ae.is_fitted:
        ae.fit(video[: min(n, 512)])
    with torch.no_grad():
        lat = torch.cat([ae.encode(video[i : i + 256], sample=False) for i in range(0, n, 256)])
    return lat, captions, torch.tensor(digits)


def oracle_code(digits: torch.Tensor, dim: int, scale: float) -> torch.Tensor:
    """The oracle diagnostic's class code: scale * one-hot(digit) in the first ten of `dim`
    pooled-vector channels, (B,) -> (B, dim); a digit of -1 (the empty prompt) gets zeros."""
    code = torch.zeros(len(digits), dim)
    keep = digits >= 0
    code[keep.nonzero()[:, 0], digits[keep]] = scale
    return code


def add_oracle_to_sampling(module, scale: float) -> None:
    """Make the module's conditioner add the oracle code of canonical prompts ("... digit d
    ...") to their pooled vector, so `generate` and `stage_decision` sample with it."""
    encode = module.conditioner.encode

    def encode_with_oracle(prompts, device, *args):
        f = encode(prompts, device, *args)
        digits = [re.search(r"digit (\d)", p) for p in prompts]
        d = torch.tensor([int(m.group(1)) if m else -1 for m in digits])
        code = oracle_code(d, f.pooled.shape[1], scale).to(f.pooled)
        return TextFeatures(f.tokens, f.mask, f.pooled + code)

    module.conditioner.encode = encode_with_oracle


def train(
    module,
    cfg,
    probe: dict,
    lat: torch.Tensor,
    captions: list[str],
    digits: torch.Tensor,
    first: torch.Tensor | None = None,
) -> dict:
    """Train module.net for `minutes` of wall time; returns counts. module.net becomes the EMA.
    first: latents (same captions) trained on instead of `lat` for the first `center_first`
    of the budget."""
    net, o, bs = module.net, cfg.model.optim, probe["bs"]
    prompts = sorted(set(captions))
    feats = module.text_encoder.encode(prompts + [""])
    idx_of = {c: i for i, c in enumerate(prompts)}
    cap_idx = torch.tensor([idx_of[c] for c in captions])
    opt = torch.optim.AdamW(
        param_groups(net.named_parameters(), o.weight_decay), lr=o.lr, betas=tuple(o.betas)
    )
    ema = copy.deepcopy(net).requires_grad_(False)
    ratios = list(cfg.model.pyramid.stage_sample_ratios)
    scale = float(probe["oracle"])
    budget, step, t0 = probe["minutes"] * 60.0, 0, time.time()
    while (elapsed := time.time() - t0) < budget:
        f = lr_factor(step, elapsed / budget, o.warmup_steps, o.warmup_start_factor, o.schedule,
                      o.min_lr_ratio)  # fmt: skip
        for g in opt.param_groups:
            g["lr"] = o.lr * f
        idx = torch.randint(0, len(lat), (bs,))
        ci = cap_idx[idx].clone()
        ci[torch.rand(bs) < cfg.model.cfg_dropout] = len(prompts)  # the empty prompt
        src = first if first is not None and elapsed < probe["center_first"] * budget else lat
        x, pooled = src[idx], feats.pooled[ci]
        if scale:
            pooled = pooled + oracle_code(digits[idx].masked_fill(ci == len(prompts), -1),
                                          pooled.shape[1], scale)  # fmt: skip
        with torch.autocast("cpu", dtype=torch.bfloat16):
            losses, _ = packed_pyramid_loss(
                net, module.path, ratios, x, torch.randn_like(x), sample_ratios(bs),
                feats.tokens[ci], feats.mask[ci], pooled,
            )  # fmt: skip
        opt.zero_grad(set_to_none=True)
        losses.mean().backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.trainer.gradient_clip_val)
        opt.step()
        step += 1
        decay = probe["ema"] if step > 100 else 0.0
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), net.parameters()):
                pe.lerp_(p, 1.0 - decay)
        if step % 200 == 0:
            print(f"step {step} {elapsed:.0f}s loss {losses.mean().item():.4f}", flush=True)
    module.net = ema
    return {"steps": step, "samples": step * bs, "train_s": round(time.time() - t0)}


def score(module, probe: dict) -> tuple[dict, list[np.ndarray]]:
    """Digits metrics of `videos` held-out canonical prompts (video i uses seed i)."""
    prompts, _ = digits_prompts(probe["videos"], 0)
    gs = None if probe["gs"] is None else float(probe["gs"])
    videos = []
    for i in range(0, len(prompts), 16):
        v = module.generate(prompts[i : i + 16], seed=i, guidance_scale=gs)
        videos += [to_uint8_frames(x) for x in v]  # (T, H, W, 3) uint8 each
    return score_videos(videos, prompts), videos


def other_caption(spec: DigitSpec) -> str:
    """Caption B of the diagnostics: digit + 5, the same colour and direction."""
    return canonical_caption((spec.digit + 5) % 10, spec.color, spec.direction)


@torch.no_grad()
def stage_decision(module, num: int, guidance: float) -> list[dict]:
    """Which pyramid stage decides the digit: sample held-out prompts with caption A (the
    prompt) on stages < k and caption B (digit + 5, same colour and direction) on stages >= k,
    for k = 0..K, and report how often the classified digit is A's or B's. Where the rate of A
    jumps between k and k + 1, stage k decided the digit. Same seeds and sampler as `score`, so
    k = K (A throughout) reproduces its digit accuracy on the first `num` prompts."""
    prompts, specs = digits_prompts(num, 0)
    other = [other_caption(s) for s in specs]
    cpu = torch.device("cpu")
    enc = module.conditioner.encode
    a, b, u = enc(prompts, cpu), enc(other, cpu), enc([""] * num, cpu)
    k_max, net = module.schedule.num_stages, module.net.eval()
    noise = start_noise(module.latent_shape, 0, num)  # as `score`: video i uses seed i
    sampler = PyramidSampler(module.schedule, list(module.hparams.sampling["steps"]))
    rows = []
    for k in range(k_max + 1):
        feats = [TextFeatures.cat([u, a if st < k else b]) for st in range(k_max)]

        def velocity(z, t, st, feats=feats):
            return net(z, t, feats[st].tokens, feats[st].mask, feats[st].pooled)

        fn = guided_velocity(velocity, guidance)
        gens = jump_generators(0, num)  # fresh per k
        video = [
            to_uint8_frames(v) for v in module.decode_latents(sampler.sample(noise, fn, gens))
        ]
        rows.append(
            {
                "prompt_until_stage": k,
                "digit_is_a": score_videos(video, prompts)["digit_acc"],
                "digit_is_b": score_videos(video, other)["digit_acc"],
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def redraw_points(num_stages: int) -> list[tuple[int, float]]:
    """(stage, local ratio r0) start points of `redraw`: stage 0 from pure noise (r0 = 1) and
    three points inside it, then the start and middle of every later stage."""
    return [(0, 1.0), (0, 0.75), (0, 0.5), (0, 0.25)] + [
        (k, r) for k in range(1, num_stages) for r in (1.0, 0.5)
    ]


@torch.no_grad()
def redraw(module, num: int, guidance: float, positions: str, frames: int) -> list[dict]:
    """Can the caption still redraw the glyph once the noisy input has fixed its place? Real
    held-out videos A (validation glyphs, placed as in the `positions` world) are noised on the
    training path to (stage, r0) and sampled from there with caption B (digit + 5, same colour
    and direction); rows report how often the classified digit is A's or B's. A model that
    draws the asked digit wherever the glyph sits redraws B down to the sigma where the input
    starts to fix the shape. From (0, 1.0), pure noise, this is `stage_decision`'s k = 0 row:
    same noise, generators and sampler."""
    rng = np.random.default_rng(1)
    # digits_prompts' specs (the same digits, colours, directions), places valid for `frames`
    specs = [place(s, positions, rng, frames)
             for s in iter_specs(num, "val", seed=0, num_frames=frames)]  # fmt: skip
    a = [canonical_caption(s.digit, s.color, s.direction) for s in specs]
    b = [other_caption(s) for s in specs]
    x = module.autoencoder.encode(render(specs, frames), sample=False)
    noise = start_noise(module.latent_shape, 0, num)  # as `score`: video i uses seed i
    cpu, net, sch = torch.device("cpu"), module.net.eval(), module.schedule
    feats = TextFeatures.cat([module.conditioner.encode([""] * num, cpu),
                              module.conditioner.encode(b, cpu)])  # fmt: skip

    def velocity(z, t, st):
        return net(z, t, feats.tokens, feats.mask, feats.pooled)

    fn = guided_velocity(velocity, guidance)
    sampler = PyramidSampler(sch, list(module.hparams.sampling["steps"]))
    rows = []
    for stage, r0 in redraw_points(sch.num_stages):
        z = module.path.sample(x, noise, stage, torch.full((num,), r0, dtype=torch.float64)).x_t
        n = max(1, round(sampler.steps[stage] * r0))  # the stage's step size, from r0 on
        rs = [r0 * r for r in ratio_grid(n)]  # r0 = 1: the sampler's own grid
        for r, r_next in zip(rs[:-1], rs[1:]):
            r_t = torch.full((num,), r, dtype=torch.float64)
            z = euler_step(z, fn(z, sch.ratio_to_timestep(r_t, stage).float(), stage), r, r_next)
        gens = jump_generators(0, num)
        for st in range(stage + 1, sch.num_stages):
            z = sampler.integrate_stage(sampler.jump(z, st, gens), st, fn)
        video = [to_uint8_frames(v) for v in module.decode_latents(z)]
        sigma = float(sch.ratio_to_sigma(torch.tensor(r0, dtype=torch.float64), stage))
        rows.append(
            {
                "stage": stage,
                "r0": r0,
                "sigma": round(sigma, 3),
                "digit_is_a": score_videos(video, a)["digit_acc"],
                "digit_is_b": score_videos(video, b)["digit_acc"],
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv: list[str]) -> dict:
    probe, overrides = parse(argv)
    torch.set_num_threads(probe["threads"])
    torch.manual_seed(0)
    overrides.append(f"video.num_frames={probe['frames']}")
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train.yaml", overrides=overrides)
    counts = {"steps": 0, "samples": 0, "train_s": 0}
    if probe["ckpt"]:  # a training run's checkpoint (its own config and fitted PCA)
        module = load_module(probe["ckpt"])
    else:
        if probe["init"]:  # continue a training run: its EMA weights, config and fitted PCA
            module = load_module(probe["init"]).train()
        else:
            module = instantiate(cfg.model)
            module.configure_model()
        n, frames = probe["n_train"], probe["frames"]
        # the PCA is fitted on the first set rendered: the diagnostic world's own glyphs
        lat, captions, digits = render_train_set(module, n, frames, probe["positions"])
        first = None
        if probe["center_first"] > 0:  # the same specs and captions, glyphs centred
            first = render_train_set(module, n, frames, "center")[0]
        if probe["load"]:
            module.net.load_state_dict(torch.load(probe["load"], weights_only=True))
        else:
            counts = train(module, cfg, probe, lat, captions, digits, first)
    if float(probe["oracle"]):
        add_oracle_to_sampling(module, float(probe["oracle"]))
    t0 = time.time()
    scores, videos = score(module, probe)
    out = Path(probe["out"])
    out.mkdir(parents=True, exist_ok=True)
    row = {
        "name": probe["name"],
        "overrides": overrides,
        "positions": probe["positions"],
        "center_first": probe["center_first"],
        "bs": probe["bs"],
        "threads": probe["threads"],
        **counts,
        **{k: round(v, 3) for k, v in scores.items()},
        "sample_s": round(time.time() - t0),
    }
    gs = module.hparams.sampling["guidance_scale"] if probe["gs"] is None else probe["gs"]
    gs = None if gs is None else float(gs)  # the diagnostics' guidance, as `score` samples
    if probe["decision"].lower() == "true":
        row["decision"] = stage_decision(module, min(probe["videos"], 48), gs)
    if probe["redraw"].lower() == "true":
        row["redraw"] = redraw(
            module, min(probe["videos"], 48), gs, probe["positions"], probe["frames"]
        )
    with open(out / "results.jsonl", "a") as fh:
        fh.write(json.dumps(row) + "\n")
    torch.save(module.net.state_dict(), out / f"{probe['name']}.pt")
    np.save(out / f"{probe['name']}_videos.npy", np.stack(videos[:16]))
    print(json.dumps(row), flush=True)
    return row


if __name__ == "__main__":
    main(sys.argv[1:])
