"""Released Pyramid Flow causal VAE weights (``causal_video_vae``) -> :class:`CausalVAE` weights.

The released network is :class:`CausalVAE` with ``temporal_down_kernel=3``,
``upsample_order="space_time"`` and ``quant_conv=True``
(``configs/vae/pyramid_flow_miniflux.yaml``).
Its key layout (diffusers-style ``down_blocks`` / ``up_blocks`` / ``mid_block``) differs from ours
in names and in three tensor transforms:

* the mid-block attention keeps ``to_q``, ``to_k``, ``to_v`` and ``to_out.0`` as linears; ours is
  one fused 1x1x1 ``qkv`` conv and a 1x1x1 ``proj`` conv;
* a temporal upsampler's conv emits its channels as ``(c p)`` (channel-major, frame offset p
  innermost); ours as ``(p c)``: the output rows are permuted;
* a decoder level's upsampler comes after its ResNets there and before the next level's
  ResNets here, so ``up_blocks.u.upsamplers`` is our ``decoder.blocks.{u+1}.0``.

:func:`reference_to_vae` and :func:`vae_to_reference` are exact inverses.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

# The pipeline's latent normalisation for the miniFLUX model (reference repository
# jy0205/Pyramid-Flow, pyramid_dit/pyramid_dit_for_video_gen_pipeline.py, model_name
# "pyramid_flux"): z = (raw - shift) * scale, the first latent frame with its own constants.
LATENT_NORMALIZATION = {
    "shift_first": -0.04,
    "scale_first": 1.0 / 1.8726,
    "shift_rest": -0.2343,
    "scale_rest": 1.0 / 3.0986,
}
_RESNET = [("norm1.", "norm1."), ("conv1.conv.", "conv1.conv."), ("norm2.", "norm2."),
           ("conv2.conv.", "conv2.conv."), ("conv_shortcut.conv.", "skip.")]  # fmt: skip


def _mid(ref: str, ours: str, attention: bool) -> Iterator[tuple[str, str, str]]:
    yield from ((f"{ref}resnets.0.{a}", f"{ours}0.{b}", "copy") for a, b in _RESNET)
    if attention:
        yield f"{ref}attentions.0.", f"{ours}1.", "attention"
    last = 2 if attention else 1
    yield from ((f"{ref}resnets.1.{a}", f"{ours}{last}.{b}", "copy") for a, b in _RESNET)


def _resamplers(
    ref: str, ours: str, spatial: bool, temporal: bool, direction: str, time_kind: str
) -> list[tuple[str, str, str]]:
    """A level's spatial and temporal resampling convs: the released block's
    ``{direction}samplers`` / ``temporal_{direction}samplers`` -> our ``.spatial`` /
    ``.temporal``."""
    plan = []
    if spatial:
        plan.append((f"{ref}{direction}samplers.0.conv.conv.", f"{ours}spatial.conv.", "copy"))
    if temporal:
        plan.append((f"{ref}temporal_{direction}samplers.0.conv.conv.", f"{ours}temporal.conv.",
                     time_kind))  # fmt: skip
    return plan


def key_plan(config: dict) -> list[tuple[str, str, str]]:
    """(released prefix, our prefix, transform) for every parameter group of ``config``."""
    levels = len(config["channel_mult"])
    n_res = int(config["num_res_blocks"])
    sd, td = list(config["spatial_down"]), list(config["temporal_down"])
    attention = bool(config.get("attention", True))
    plan = [("encoder.conv_in.conv.", "encoder.conv_in.conv.", "copy")]
    for i in range(levels):
        for j in range(n_res):
            ref, ours = f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.blocks.{i}.{j}."
            plan += [(ref + a, ours + b, "copy") for a, b in _RESNET]
        plan += _resamplers(f"encoder.down_blocks.{i}.", f"encoder.blocks.{i}.{n_res}.",
                            sd[i], td[i], "down", "copy")  # fmt: skip
    plan += list(_mid("encoder.mid_block.", "encoder.mid.", attention))
    plan += [("encoder.conv_norm_out.", "encoder.norm_out.", "copy"),
             ("encoder.conv_out.conv.", "encoder.conv_out.conv.", "copy"),
             ("decoder.conv_in.conv.", "decoder.conv_in.conv.", "copy")]  # fmt: skip
    plan += list(_mid("decoder.mid_block.", "decoder.mid.", attention))
    # our decoder block b is level L-1-b; it starts with an Upsample if that level downsamples
    ups = [sd[levels - 1 - b] or td[levels - 1 - b] for b in range(levels)]
    for u in range(levels):
        for j in range(n_res + 1):
            ref, ours = f"decoder.up_blocks.{u}.resnets.{j}.", f"decoder.blocks.{u}.{j + ups[u]}."
            plan += [(ref + a, ours + b, "copy") for a, b in _RESNET]
        if u + 1 < levels and ups[u + 1]:
            level = levels - 2 - u
            plan += _resamplers(f"decoder.up_blocks.{u}.", f"decoder.blocks.{u + 1}.0.",
                                sd[level], td[level], "up", "time_up")  # fmt: skip
    plan += [("decoder.conv_norm_out.", "decoder.norm_out.", "copy"),
             ("decoder.conv_out.conv.", "decoder.conv_out.conv.", "copy")]  # fmt: skip
    if config.get("quant_conv", False):
        plan += [("quant_conv.conv.", "quant_conv.conv.", "copy"),
                 ("post_quant_conv.conv.", "post_quant_conv.conv.", "copy")]  # fmt: skip
    return plan


def time_up_order(out_channels: int) -> Tensor:
    """Rows of a temporal upsampler's conv: ``ours[p C + c] = released[2 c + p]``."""
    c = out_channels // 2
    return torch.arange(out_channels).reshape(c, 2).T.reshape(-1)


def reference_to_vae(state: dict[str, Tensor], config: dict) -> dict[str, Tensor]:
    """Convert a released VAE state dict; one line naming a missing or unused key."""
    out: dict[str, Tensor] = {}
    used: set[str] = set()

    def take(key: str) -> Tensor:
        if key not in state:
            raise KeyError(
                f"released VAE key {key} is missing; fix: the complete causal_video_vae folder, "
                "converted with vae=pyramid_flow_miniflux"
            )
        used.add(key)
        return state[key]

    for ref, ours, kind in key_plan(config):
        if kind == "attention":
            for name in ("weight", "bias"):
                qkv = [take(f"{ref}to_{x}.{name}") for x in "qkv"]
                proj = take(f"{ref}to_out.0.{name}")
                if name == "weight":  # linears (C, C) -> 1x1x1 convs (C, C, 1, 1, 1)
                    qkv, proj = (
                        [w[..., None, None, None] for w in qkv],
                        proj[..., None, None, None],
                    )
                out[f"{ours}qkv.{name}"] = torch.cat(qkv, dim=0)
                out[f"{ours}proj.{name}"] = proj
                out[f"{ours}norm.{name}"] = take(f"{ref}group_norm.{name}")
            continue
        for name in ("weight", "bias"):
            if ref.endswith("conv_shortcut.conv.") and f"{ref}{name}" not in state:
                continue  # a ResNet without a channel change has no shortcut conv
            t = take(f"{ref}{name}")
            out[f"{ours}{name}"] = t[time_up_order(t.shape[0])] if kind == "time_up" else t
    unused = sorted(set(state) - used)
    if unused:
        raise KeyError(
            f"released VAE key {unused[0]} has no counterpart in CausalVAE; fix: convert with "
            "the vae preset of the checkpoint (vae=pyramid_flow_miniflux)"
        )
    return out


def vae_to_reference(state: dict[str, Tensor], config: dict) -> dict[str, Tensor]:
    """Inverse of :func:`reference_to_vae` (our weights in the released layout)."""
    out: dict[str, Tensor] = {}
    for ref, ours, kind in key_plan(config):
        if kind == "attention":
            for name in ("weight", "bias"):
                q, k, v = state[f"{ours}qkv.{name}"].chunk(3, dim=0)
                proj = state[f"{ours}proj.{name}"]
                if name == "weight":
                    q, k, v, proj = (w.flatten(1) for w in (q, k, v, proj))
                for x, t in zip("qkv", (q, k, v)):
                    out[f"{ref}to_{x}.{name}"] = t
                out[f"{ref}to_out.0.{name}"] = proj
                out[f"{ref}group_norm.{name}"] = state[f"{ours}norm.{name}"]
            continue
        for name in ("weight", "bias"):
            if f"{ours}{name}" not in state:
                continue  # no shortcut conv
            t = state[f"{ours}{name}"]
            if kind == "time_up":
                t = t[torch.argsort(time_up_order(t.shape[0]))]
            out[f"{ref}{name}"] = t
    return out
