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
