"""LoRA fine-tuning of the DiT with peft (`finetune=lora`)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


def load_base_weights(net: nn.Module, ckpt_path: str | Path) -> None:
    """Copy a trained checkpoint's DiT weights (`net.*` in its state_dict) into `net`."""
    path = Path(ckpt_path)
    if not path.exists():
        raise FileNotFoundError(
            f"finetune.base_ckpt={ckpt_path} does not exist; fix: a .ckpt (or sharded folder) "
            "written by src/train.py"
        )
    from src.models.checkpoint import load_sharded

    ckpt = load_sharded(path) if path.is_dir() else torch.load(path, "cpu", weights_only=True)
    state = {k[4:]: v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
    net.load_state_dict(state)


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
