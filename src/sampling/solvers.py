"""Pure ODE steps over a velocity callable (no models, no Lightning)."""

from __future__ import annotations

import torch


def euler_step(z: torch.Tensor, v: torch.Tensor, r: float, r_next: float) -> torch.Tensor:
    """One explicit Euler step of dz/dr = v from r to r_next, accumulated in fp32."""
    return (z.float() + (r_next - r) * v.float()).to(z.dtype)


def ratio_grid(num_steps: int, grid: str = "uniform", ratio_min: float = 0.001) -> list[float]:
    """Local ratios r_0 = 1 > ... > r_n = 0 visited by an n-step stage integration.

    "reference": r_j = linspace(1, ratio_min, n) then 0 (the reference code; its last step only
    moves by ratio_min, so n steps behave like n - 1). "uniform": linspace(1, 0, n + 1).
    """
    if num_steps < 1:
        raise ValueError(f"sampling steps={num_steps} must be >= 1 per stage; fix: e.g. [8, 8, 8]")
    if grid == "uniform":
        return torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64).tolist()
    if grid == "reference":
        if num_steps == 1:
            return [1.0, 0.0]
        return torch.linspace(1.0, ratio_min, num_steps, dtype=torch.float64).tolist() + [0.0]
    raise ValueError(f"sampling.ratio_grid={grid!r} is unknown; fix: 'uniform' or 'reference'")
