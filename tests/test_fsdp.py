"""FSDP2 on 2 CPU ranks (gloo) gives the single-process result on the same global batch."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from src.flow.losses import packed_pyramid_loss
from src.flow.pyramid import PyramidPath
from src.flow.schedules import build_stage_schedule
from tests.test_dit import C, make_net, text

STEPS, BATCH = 3, 8


def _batch(step: int):
    g = torch.Generator().manual_seed(100 + step)
    lat = torch.randn(BATCH, C, 2, 8, 8, generator=g)
    noise = torch.randn(BATCH, C, 2, 8, 8, generator=g)
    r = torch.rand(BATCH, generator=g, dtype=torch.float64)
    return lat, noise, r, *text(BATCH, seed=step)


def _train(net, rows: slice, world: int):
    path = PyramidPath(build_stage_schedule([0.0, 0.5, 1.0], 1 / 3))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    losses = []
    for step in range(STEPS):
        lat, noise, r, ctx, mask, pooled = (x[rows] for x in _batch(step))
        loss, _ = packed_pyramid_loss(net, path, [1, 1], lat, noise, r, ctx, mask, pooled)
        loss = loss.mean()
        opt.zero_grad()
        loss.backward()  # FSDP2 averages gradients over ranks: the global-batch mean
        opt.step()
        reported = loss.detach().clone()
        if world > 1:
            dist.all_reduce(reported)
            reported /= world
        losses.append(float(reported))
    return losses


def _rank(rank: int, world: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29561")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from torch.distributed.device_mesh import init_device_mesh

    from src.utils.fsdp import apply_fsdp2

    mesh = init_device_mesh("cpu", (world, 1), mesh_dim_names=("data_parallel", "tp"))
    net = apply_fsdp2(make_net(), mesh, reshard_after_forward=True)
    per = BATCH // world
    losses = _train(net, slice(rank * per, (rank + 1) * per), world)
    full = {k: v.full_tensor() for k, v in net.state_dict().items()}
    if rank == 0:
        torch.save({"losses": losses, "state": full}, out)
    dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp2_two_ranks_match_one_process_on_the_same_global_batch(tmp_path):
    out = str(tmp_path / "fsdp.pt")
    mp.spawn(_rank, args=(2, out), nprocs=2, join=True)
    sharded = torch.load(out, weights_only=True)
    single = make_net()
    losses = _train(single, slice(0, BATCH), 1)
    assert sharded["losses"] == pytest.approx(losses, rel=1e-5)
    for k, v in single.state_dict().items():
        assert torch.allclose(sharded["state"][k], v, atol=1e-5), k
