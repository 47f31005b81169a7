"""Convert released Pyramid Flow weights into checkpoints this repository loads.

    python src/convert.py reference_dir=PATH/pyramid-flow-miniflux variant=384p   # DiT
    python src/convert.py reference_dir=PATH/pyramid-flow-miniflux part=vae       # VAE
    python src/convert.py reference_dir=PATH part=module module_experiment=miniflux_384p

Reads every ``*.safetensors`` shard of ``<reference_dir>/diffusion_transformer_<variant>`` (the
key layout of diffusers' FluxTransformer2DModel), converts it with
:func:`src.models.flux_conversion.flux_to_dit`, checks every key and shape against a PyramidDiT
built from ``net`` (``model/net=dit_2b`` and the released widths; built on the meta device, so
no memory is spent), and writes ``out``: a safetensors file of our DiT keys, with the net
config and the source files in its metadata.

``part=vae`` reads ``<reference_dir>/causal_video_vae``, converts it with
:func:`src.models.vae.released.reference_to_vae` into a :class:`CausalVAE` built from ``vae``
(``configs/vae/pyramid_flow_miniflux.yaml``), and writes ``vae_out``: a ``save_vae`` export with
the reference pipeline's latent normalisation (``autoencoder=pyramid_flow_miniflux`` loads
it). Nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import hydra
import rootutils
import torch
from omegaconf import DictConfig, OmegaConf

rootutils.setup_root(__file__, indicator=".project-root", pythonpath=True)

from src.models.autoencoders import autoencoder_class  # noqa: E402
from src.models.flux_conversion import check_against, flux_to_dit  # noqa: E402
from src.models.registry import build_net  # noqa: E402
from src.utils import RankedLogger, extras  # noqa: E402

log = RankedLogger(__name__)
VARIANTS = ("384p", "768p", "image")


def read_shards(folder: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Merge the tensors of every safetensors shard of a folder; (state, file names)."""
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"no *.safetensors in {folder}; fix: reference_dir must be the downloaded "
            "pyramid-flow-miniflux folder (it holds diffusion_transformer_<variant>/)"
        )
    state: dict[str, torch.Tensor] = {}
    for f in files:
        part = load_file(str(f))
        clash = sorted(set(part) & set(state))
        if clash:
            raise ValueError(f"key {clash[0]} appears in two shards of {folder}; fix: one copy")
        state.update(part)
    return state, [f.name for f in files]


def convert_dit(cfg: DictConfig) -> Path:
    if cfg.variant not in VARIANTS:
        raise ValueError(f"variant={cfg.variant!r} is unknown; fix: one of {list(VARIANTS)}")
    folder = Path(cfg.reference_dir) / f"diffusion_transformer_{cfg.variant}"
    state, files = read_shards(folder)
    net_cfg = OmegaConf.to_container(cfg.net, resolve=True)
    ours = flux_to_dit(state, int(net_cfg["in_channels"]), int(net_cfg["patch_size"]))
    with torch.device("meta"):
        target = build_net(**net_cfg).state_dict()
    check_against(ours, target)
    from safetensors.torch import save_file

    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    meta = {"net": json.dumps(net_cfg), "source": str(folder), "files": json.dumps(files)}
    save_file({k: v.contiguous() for k, v in ours.items()}, str(tmp), metadata=meta)
    tmp.replace(out)  # never a half-written checkpoint under the final name
    n = sum(v.numel() for v in ours.values())
    log.info(f"converted {len(ours)} tensors ({n:,} parameters) from {folder} -> {out}")
    return out


def convert_vae(cfg: DictConfig) -> Path:
    from src.models.vae.causal_vae import CausalVAE, save_vae
    from src.models.vae.released import LATENT_NORMALIZATION, reference_to_vae

    folder = Path(cfg.reference_dir) / "causal_video_vae"
    state, files = read_shards(folder)
    config = OmegaConf.to_container(cfg.vae, resolve=True)
    ours = reference_to_vae(state, config)
    vae = CausalVAE(**config)
    fix = "vae=pyramid_flow_miniflux (the released layout)"
    check_against(ours, vae.state_dict(), net="CausalVAE", fix=fix)
    vae.load_state_dict(ours)
    c = vae.latent_channels
    norm = {k: torch.full((c,), v) for k, v in LATENT_NORMALIZATION.items()}
    why = "reference pipeline constants for model_name pyramid_flux"
    meta = {"source": str(folder), "files": files, "normalization": why}
    save_vae(cfg.vae_out, vae, config, norm, meta)
    n = sum(p.numel() for p in vae.parameters())
    log.info(f"converted the VAE ({n:,} parameters) from {folder} -> {cfg.vae_out}")
    return Path(cfg.vae_out)


def convert_module(cfg: DictConfig) -> Path:
    """``part=module``: a checkpoint ``src/sample.py`` / ``src/eval.py`` load (``ckpt_path=``):
    the hyperparameters of ``python src/train.py experiment=<experiment>`` and the DiT written
    by ``part=dit`` (``out``), with no training state. Needs the composed experiment's files
    (the converted VAE) only when it is loaded."""
    import lightning
    from hydra import compose
    from safetensors.torch import load_file

    overrides = [f"experiment={cfg.module_experiment}", *cfg.get("train_overrides", [])]
    train_cfg = compose(config_name="train", overrides=overrides)
    hparams = OmegaConf.to_container(train_cfg.model, resolve=True)
    hparams = {
        k: v for k, v in hparams.items() if k not in ("_target_", "_convert_", "_recursive_")
    }
    ae_cls = autoencoder_class(hparams["autoencoder"])
    if ae_cls.requires_fit:
        raise ValueError(
            f"module_experiment={cfg.module_experiment} uses a data-fitted autoencoder "
            f"({ae_cls.__name__}) whose fit is not in the released weights; fix: "
            "an experiment with the released VAE (experiment=miniflux_384p or miniflux_768p)"
        )
    dit = Path(cfg.out)
    if not dit.is_file():
        raise FileNotFoundError(
            f"out={dit} does not exist; fix: convert the DiT first (python src/convert.py "
            f"reference_dir=... variant={cfg.variant})"
        )
    weights = load_file(str(dit))
    with torch.device("meta"):
        check_against(weights, build_net(**hparams["net"]).state_dict())
    ckpt = {
        "hyper_parameters": hparams,
        "state_dict": {f"net.{k}": v for k, v in weights.items()},
        "global_step": 0,
        "epoch": 0,
        "pytorch-lightning_version": lightning.__version__,
    }
    out = Path(cfg.module_out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, out.with_suffix(".tmp"))
    out.with_suffix(".tmp").replace(out)
    log.info(f"wrote a sampling checkpoint for experiment={cfg.module_experiment} -> {out}")
    return out


@hydra.main(version_base="1.3", config_path="../configs", config_name="convert.yaml")
def main(cfg: DictConfig) -> None:
    extras(cfg)
    parts = {"dit": convert_dit, "vae": convert_vae, "module": convert_module}
    if cfg.part not in parts:
        raise ValueError(f"part={cfg.part!r} is unknown; fix: one of {list(parts)}")
    parts[cfg.part](cfg)


if __name__ == "__main__":
    main()
