"""The learning-rate schedule follows whichever budget stops the run (steps, time, FLOPs)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.callbacks import Timer

from src.callbacks.compute_accounting import ComputeAccounting
from src.utils.optim import budget_progress, lr_factor, param_groups


def test_lr_factor_warmup_then_cosine_to_min():
    kw = dict(warmup_steps=10, warmup_start_factor=0.1, schedule="cosine", min_lr_ratio=0.2)
    assert lr_factor(0, 0.0, **kw) == pytest.approx(0.1)
    assert lr_factor(5, 0.0, **kw) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(10, 0.0, **kw) == pytest.approx(1.0)
    assert lr_factor(50, 0.5, **kw) == pytest.approx(0.2 + 0.8 * 0.5)
    assert lr_factor(99, 1.0, **kw) == pytest.approx(0.2)
    # monotone non-increasing after warm-up
    vals = [lr_factor(20, p / 20, **kw) for p in range(21)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))
    assert lr_factor(99, 0.7, schedule="constant") == 1.0
    with pytest.raises(ValueError, match="model.optim.schedule='linear'"):
        lr_factor(1, 0.1, schedule="linear")


def _trainer(step, max_steps, callbacks):
    return SimpleNamespace(global_step=step, max_steps=max_steps, callbacks=callbacks)


def test_budget_progress_takes_the_binding_budget():
    # steps only
    assert budget_progress(_trainer(300, 1000, [])) == pytest.approx(0.3)
    # a time guard that is further along than the step count wins (a slow machine)
    timer = Timer(duration="00:00:10:00")  # 600 s
    timer._offset = 450.0  # as restored from a checkpoint, no clock running
    assert timer.time_elapsed("train") == pytest.approx(450.0)
    assert budget_progress(_trainer(300, 1000, [timer])) == pytest.approx(0.75)
    # ... and on a fast machine the step budget binds
    assert budget_progress(_trainer(900, 1000, [timer])) == pytest.approx(0.9)
    # a FLOP budget
    acc = ComputeAccounting(peak_flops=1.0, max_flops=1e12)
    acc.cumulative_flops = 0.95e12
    assert budget_progress(_trainer(10, -1, [acc])) == pytest.approx(0.95)
    # clipped to 1 and 0 without any budget
    timer._offset = 900.0
    assert budget_progress(_trainer(1, 1000, [timer])) == 1.0
    assert budget_progress(_trainer(5, -1, [])) == 0.0


def test_time_guarded_schedule_reaches_its_floor_when_the_guard_stops():
    """A run stopped by its time guard ends at min_lr_ratio, not halfway down the cosine."""
    timer = Timer(duration="00:00:01:40")  # 100 s
    kw = dict(warmup_steps=2, schedule="cosine", min_lr_ratio=0.1)
    trainer = _trainer(0, 10_000, [timer])
    for step, elapsed in [(100, 50.0), (200, 100.0)]:  # only 200 of 10,000 steps done
        trainer.global_step, timer._offset = step, elapsed
        f = lr_factor(step, budget_progress(trainer), **kw)
    assert f == pytest.approx(0.1)
    trainer.global_step, timer._offset = 100, 50.0
    mid = lr_factor(100, budget_progress(trainer), **kw)
    assert budget_progress(trainer) == pytest.approx(0.5)  # 50 s of a 100 s guard
    assert mid == pytest.approx(0.55)  # halfway down the cosine from 1 to 0.1


def test_param_groups_split_decay():
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    net[1].weight.requires_grad_(False)
    decay, no_decay = param_groups(net.named_parameters(), 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 3])]
    assert {tuple(p.shape) for p in no_decay["params"]} == {(4,)}
    assert len(no_decay["params"]) == 2  # the linear bias and the norm bias (weight frozen)


def test_norm_weights_do_not_decay_and_build_optimizer_follows_the_config():
    from src.utils.optim import build_optimizer

    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    decay, no_decay = param_groups(net.named_parameters(), 0.1)
    assert [id(p) for p in decay["params"]] == [id(net[0].weight)]
    assert {id(p) for p in no_decay["params"]} == {
        id(net[0].bias),
        id(net[1].weight),
        id(net[1].bias),
    }
    optim = dict(lr=2e-3, betas=[0.8, 0.9], eps=1e-6, weight_decay=0.05, warmup_steps=4,
                 warmup_start_factor=0.25, schedule="cosine", min_lr_ratio=0.1)  # fmt: skip
    progress = {"value": 0.0}
    out = build_optimizer(net.named_parameters(), optim, lambda: progress["value"])
    opt, sched = out["optimizer"], out["lr_scheduler"]["scheduler"]
    assert out["lr_scheduler"]["interval"] == "step"
    assert opt.defaults["betas"] == (0.8, 0.9) and opt.defaults["eps"] == 1e-6
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
    assert opt.param_groups[0]["lr"] == pytest.approx(2e-3 * 0.25)  # warm-up starts at 1/4
    for _ in range(4):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(2e-3)  # warm-up done, progress 0
    progress["value"] = 1.0  # the binding budget is used up
    opt.step()
    sched.step()
    assert opt.param_groups[1]["lr"] == pytest.approx(2e-4)  # min_lr_ratio x lr
