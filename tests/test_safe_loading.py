"""Checkpoints from strangers: a crafted pickle payload is refused without running."""

import pickle

import pytest
import torch

from src.models.checkpoint import load_module


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):  # unpickling this would create the marker file
        return (open, (self.marker, "w"))


def test_payload_works_when_unpickled_so_the_test_can_fail(tmp_path):
    marker = tmp_path / "proof"
    pickle.loads(pickle.dumps(_Payload(marker)))
    assert marker.exists()


@pytest.mark.parametrize("sharded", [False, True])
def test_crafted_checkpoint_is_refused_without_executing(tmp_path, sharded):
    marker = tmp_path / "executed"
    evil = {"hyper_parameters": _Payload(marker), "state_dict": {}}
    if sharded:  # a sharded checkpoint folder whose meta.pt carries the payload
        path = tmp_path / "last.ckpt"
        path.mkdir()
        torch.save(evil, path / "meta.pt")
    else:
        path = tmp_path / "evil.ckpt"
        torch.save(evil, path)
    with pytest.raises(pickle.UnpicklingError):
        load_module(path)
    assert not marker.exists()


def _tiny_checkpoint(path) -> tuple[dict, torch.Tensor]:
    """A tiny module's checkpoint (PCA fitted on random videos) and its DiT's output on a
    fixed input."""
    from omegaconf import OmegaConf

    from src.models.pyramid_module import PyramidFlowModule
    from tests.conftest import compose_train

    cfg = compose_train(["experiment=tiny"], return_hydra_config=False)
    hp = OmegaConf.to_container(cfg.model, resolve=True)
    for key in ("_target_", "_convert_", "_recursive_"):
        hp.pop(key)
    torch.manual_seed(0)
    module = PyramidFlowModule(**hp)
    module.configure_model()
    module.autoencoder.fit(torch.rand(2, 3, 9, 32, 32) * 2 - 1)
    torch.save({"hyper_parameters": hp, "state_dict": module.state_dict()}, path)
    return hp, _dit_output(module)


def _dit_output(module) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    z = torch.randn(1, *module.latent_shape, generator=g)
    feats = module.conditioner.encode(["a red digit 3 moving left"], torch.device("cpu"))
    with torch.no_grad():
        return module.net(z, torch.tensor([500.0]), feats.tokens, feats.mask, feats.pooled)


def test_checkpoint_from_before_targets_loads_the_same_model(tmp_path):
    """Checkpoints written before the configs named classes with `_target_` carry `name: pca`,
    `name: hash` and a net without `_target_`: they load into the same classes and outputs."""
    from src.models.autoencoders import LEGACY_AUTOENCODERS
    from src.models.text_encoders import LEGACY_TEXT_ENCODERS

    path = tmp_path / "new.ckpt"
    hp, out = _tiny_checkpoint(path)
    assert hp["net"].pop("_target_") == "src.models.dit.PyramidDiT"
    ae_target, te_target = hp["autoencoder"].pop("_target_"), hp["text_encoder"].pop("_target_")
    hp["autoencoder"]["name"] = {v: k for k, v in LEGACY_AUTOENCODERS.items()}[ae_target]
    hp["text_encoder"]["name"] = {v: k for k, v in LEGACY_TEXT_ENCODERS.items()}[te_target]
    ckpt = torch.load(path, weights_only=True)
    torch.save({**ckpt, "hyper_parameters": hp}, tmp_path / "old.ckpt")
    new, old = load_module(path), load_module(tmp_path / "old.ckpt")
    assert type(old.autoencoder) is type(new.autoencoder)
    assert type(old.conditioner.encoder) is type(new.conditioner.encoder)
    torch.testing.assert_close(_dit_output(old), out, rtol=0, atol=0)
    torch.testing.assert_close(_dit_output(new), out, rtol=0, atol=0)


@pytest.mark.parametrize("group", ["autoencoder", "text_encoder", "net"])
def test_checkpoint_naming_a_function_is_refused_without_calling_it(tmp_path, group):
    """A checkpoint's hparams are plain data, but a `_target_` in them is a name that gets
    called: one that is not a component class is refused before anything is built."""
    path = tmp_path / "ok.ckpt"
    hp, _ = _tiny_checkpoint(path)
    marker = tmp_path / "executed"
    hp[group] = {"_target_": "os.system", "command": f"touch {marker}"}
    torch.save({**torch.load(path, weights_only=True), "hyper_parameters": hp}, path)
    field = "model.net" if group == "net" else group
    with pytest.raises(ValueError, match=rf"{field}._target_='os.system' is not a \w+ subclass"):
        load_module(path)
    assert not marker.exists()
