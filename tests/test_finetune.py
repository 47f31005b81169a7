"""LoRA fine-tuning (finetune=lora): adapters start as a no-op, only they train, the base stays."""

import pytest
import torch
from hydra.core.global_hydra import GlobalHydra

from src.utils.finetune import apply_lora, load_base_weights
from tests.test_dit import C, make_net, randomize, text

TARGETS = ["qkv", "img_proj", "txt_proj", "linear1", "linear2"]


def test_lora_starts_as_the_base_model_and_only_adapters_train():
    net = randomize(make_net())
    ctx, mask, pooled = text(2)
    x, t = torch.randn(2, C, 2, 8, 8), torch.tensor([10.0, 900.0])
    before = net(x, t, ctx, mask, pooled)
    targeted = {
        n: m
        for n, m in net.named_modules()
        if isinstance(m, torch.nn.Linear) and any(n == k or n.endswith("." + k) for k in TARGETS)
    }
    trainable = apply_lora(net, rank=4, alpha=8, dropout=0.0, target_modules=TARGETS)
    assert trainable == sum(4 * (m.in_features + m.out_features) for m in targeted.values())
    assert torch.equal(net(x, t, ctx, mask, pooled), before)  # B = 0: exactly the base model
    assert all(("lora_" in n) == p.requires_grad for n, p in net.named_parameters())
    frozen = {n: p.clone() for n, p in net.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        net(x, t, ctx, mask, pooled).pow(2).mean().backward()
        opt.step()
    assert all(torch.equal(p, frozen[n]) for n, p in net.named_parameters() if n in frozen)
    assert not torch.allclose(net(x, t, ctx, mask, pooled), before)


def test_lora_run_from_a_base_checkpoint_keeps_the_base_and_samples(tmp_path, tiny_data_dir):
    from src.models.checkpoint import load_module
    from src.train import train
    from tests.conftest import tiny_cfg

    train(tiny_cfg(tmp_path / "base", tiny_data_dir))
    GlobalHydra.instance().clear()
    base = tmp_path / "base" / "checkpoints" / "last.ckpt"
    cfg = tiny_cfg(
        tmp_path / "lora", tiny_data_dir, ["finetune=lora", f"finetune.base_ckpt={base}"]
    )
    train(cfg)
    GlobalHydra.instance().clear()
    lora = torch.load(tmp_path / "lora" / "checkpoints" / "last.ckpt", weights_only=True)
    base_sd = torch.load(base, weights_only=True)["state_dict"]
    raw = lora["current_model_state"]  # the trained weights (state_dict holds their EMA)
    for k, v in raw.items():
        if k.startswith("net.") and "lora_" not in k:
            assert torch.equal(v, base_sd[k.replace(".base_layer", "")]), k
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in raw.items())
    module = load_module(tmp_path / "lora" / "checkpoints" / "last.ckpt")
    assert module.generate(["a red digit 3 moving right"], seed=0).shape == (1, 3, 9, 32, 32)


def test_missing_base_checkpoint_is_one_clear_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="finetune.base_ckpt=.*does not exist"):
        load_base_weights(make_net(), tmp_path / "nope.ckpt")


def test_full_finetune_starts_from_the_base_weights_and_its_latent_space(tmp_path, tiny_data_dir):
    from src.train import train
    from tests.conftest import tiny_cfg

    train(tiny_cfg(tmp_path / "base", tiny_data_dir))
    GlobalHydra.instance().clear()
    base = tmp_path / "base" / "checkpoints" / "last.ckpt"
    base_sd = torch.load(base, weights_only=True)["state_dict"]  # the base's EMA weights
    # LR 0: the weights the fine-tune starts from are the weights it saves
    extra = ["finetune=full", f"finetune.base_ckpt={base}", "model.optim.lr=0.0", "seed=7"]
    train(tiny_cfg(tmp_path / "full", tiny_data_dir, extra))
    GlobalHydra.instance().clear()
    raw = torch.load(tmp_path / "full" / "checkpoints" / "last.ckpt", weights_only=True)
    raw = raw["current_model_state"]
    nets = [k for k in base_sd if k.startswith(("net.", "autoencoder."))]
    assert any(k.startswith("autoencoder.") for k in nets)  # the tiny recipe fits a PCA
    for k in nets:
        assert torch.equal(raw[k], base_sd[k]), k


def test_base_checkpoint_of_another_net_size_is_one_clear_line(tmp_path):
    from safetensors.torch import save_file

    base = make_net()
    path = tmp_path / "base.safetensors"
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(path))
    target = make_net()
    with torch.no_grad():
        for p in target.parameters():
            p.add_(1.0)  # differs from the base everywhere
    load_base_weights(target, path)  # the same size loads: every weight is the base's
    got, want = target.state_dict(), base.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)
    wider = make_net(mlp_ratio=2.0)  # same widths, other MLP size
    with pytest.raises(ValueError, match=r"DiT key \S+ has shape .* there and .* here; fix"):
        load_base_weights(wider, path)
    deeper = make_net(depth_single=len(base.single_blocks) + 1)
    with pytest.raises(ValueError, match=r"single_blocks\.\d+\.\S+ is missing there"):
        load_base_weights(deeper, path)


def test_lora_run_from_a_converted_safetensors_dit(tmp_path, tiny_data_dir):
    """finetune=lora on a DiT converted by src/convert.py (a .safetensors of our net keys)."""
    from omegaconf import OmegaConf
    from safetensors.torch import save_file

    from src.models.registry import build_net
    from src.train import train
    from tests.conftest import tiny_cfg

    cfg = tiny_cfg(tmp_path / "x", tiny_data_dir)
    torch.manual_seed(0)
    dit = randomize(build_net(**OmegaConf.to_container(cfg.model.net, resolve=True)))
    base = tmp_path / "converted.safetensors"
    save_file({k: v.contiguous() for k, v in dit.state_dict().items()}, str(base))
    GlobalHydra.instance().clear()
    extra = ["finetune=lora", f"finetune.base_ckpt={base}"]
    train(tiny_cfg(tmp_path / "lora", tiny_data_dir, extra))
    GlobalHydra.instance().clear()
    raw = torch.load(tmp_path / "lora" / "checkpoints" / "last.ckpt", weights_only=True)
    raw = raw["current_model_state"]
    frozen = {k[4:].replace(".base_layer", ""): v for k, v in raw.items()}
    frozen = {k: v for k, v in frozen.items() if "lora_" not in k and k in dit.state_dict()}
    assert len(frozen) == len(dit.state_dict())
    assert all(torch.equal(v, dit.state_dict()[k]) for k, v in frozen.items())
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in raw.items())
