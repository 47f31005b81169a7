"""Fine-tuning from a trained checkpoint: all weights (`finetune=full`) or LoRA adapters with
peft (`finetune=lora`)."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from src.utils.checkpoint_io import read_checkpoint


def load_base_state(ckpt_path: str | Path) -> dict:
    """The model state_dict of a checkpoint written by src/train.py (its EMA weights when it
    was trained with EMA: Lightning's WeightAveraging stores the average as `state_dict`), or
    of a DiT converted by src/convert.py (a .safetensors file of `net.*` weights)."""
    path = Path(ckpt_path)
    if not path.exists():
        raise FileNotFoundError(
            f"finetune.base_ckpt={ckpt_path} does not exist; fix: a .ckpt (or sharded folder) "
            "written by src/train.py"
        )
    if path.suffix == ".safetensors":  # a converted DiT (python src/convert.py): net weights
        from safetensors.torch import load_file

        return {f"net.{k}": v for k, v in load_file(str(path)).items()}
    return read_checkpoint(path)["state_dict"]


def load_base_weights(net: nn.Module, ckpt_path: str | Path, state: dict | None = None) -> None:
    """Copy a trained checkpoint's DiT weights (`net.*` in its state_dict) into `net`."""
    state = load_base_state(ckpt_path) if state is None else state
    base = {k[4:]: v for k, v in state.items() if k.startswith("net.")}
    own = net.state_dict()
    for key in sorted(set(own) | set(base)):
        if key not in base or key not in own or base[key].shape != own[key].shape:
            where = (
                f"has shape {tuple(base[key].shape)} there and {tuple(own[key].shape)} here"
                if key in base and key in own
                else ("is missing there" if key not in base else "does not exist here")
            )
            raise ValueError(
                f"finetune.base_ckpt={ckpt_path}: DiT key {key} {where}; fix: the base run's "
                "model.net settings (hidden_size, depths, patch_size, text widths)"
            )
    net.load_state_dict(base)


def load_base_autoencoder(autoencoder: nn.Module, state: dict) -> bool:
    """Adopt the base run's fitted autoencoder buffers (e.g. its PCA), so the fine-tuned DiT
    works in the latent space it was trained in. False if the checkpoint holds none."""
    sub = {k[len("autoencoder.") :]: v for k, v in state.items() if k.startswith("autoencoder.")}
    if not sub:
        return False
    autoencoder.load_state_dict(sub)
    return True


def apply_lora(net: nn.Module, rank: int, alpha: float, dropout: float, target_modules) -> int:
    """Inject LoRA adapters (B zero-initialised: the model is unchanged until trained) and
    freeze everything else. Returns the number of trainable parameters."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(
        r=int(rank),
        lora_alpha=float(alpha),
        lora_dropout=float(dropout),
        target_modules=list(target_modules),
    )
    inject_adapter_in_model(config, net)
    for name, p in net.named_parameters():
        p.requires_grad_("lora_" in name)
    return sum(p.numel() for p in net.parameters() if p.requires_grad)
