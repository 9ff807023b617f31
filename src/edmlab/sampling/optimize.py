"""Time steps fitted to a denoiser: a GITS-style search (Chen et al. 2024, "trajectory regularity"), then a fit.

A few pilot trajectories of the model's own ODE are solved accurately (Heun on
`fine_steps` rho-7 levels); the cost of a coarse step sigma_i ->
sigma_j is the RMS error of one Euler step (DDIM, the first-order step every
solver here shares) from the pilots' state at sigma_i against their state at
sigma_j, and dynamic programming picks the N - 1 steps from sigma_max to sigma_min
with the least total cost. Given the solver (`solve`), the steps are then fitted to
its own end-point error on the pilots: the best of a two-parameter family (one jump
from sigma_max to s_1, levels even in log sigma down to s_2, one jump to sigma_min)
and the DP steps, polished level by level. The pilots come from `seed`, so the steps are
reproducible; `cache` (a JSON file, e.g. beside the checkpoint) keeps one set of steps per
(num_steps, range, search settings), written atomically.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path

import torch

from edmlab.fileio import atomic_write

__all__ = ["optimized_steps", "trajectory_costs", "best_path"]


def _pilots(denoise: Callable, sigmas: torch.Tensor, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Heun on the scaled ODE through every level of `sigmas` (all > 0): states x_j and D(x_j; sigma_j), [M, P*d]."""
    x = latents * sigmas[0]
    xs, ds = [], []
    for j, sigma in enumerate(sigmas):
        denoised = denoise(x, sigma)
        xs.append(x.flatten())
        ds.append(denoised.flatten())
        if j + 1 < len(sigmas):
            sigma_next = sigmas[j + 1]
            d = (x - denoised) / sigma
            x_euler = x + (sigma_next - sigma) * d
            x = x + (sigma_next - sigma) * (d + (x_euler - denoise(x_euler, sigma_next)) / sigma_next) / 2
    return torch.stack(xs), torch.stack(ds)


def trajectory_costs(sigmas: torch.Tensor, xs: torch.Tensor, ds: torch.Tensor) -> torch.Tensor:
    """C[i, j] = RMS of x_i + (sigma_j - sigma_i)(x_i - D_i)/sigma_i - x_j (i < j; inf elsewhere), by Gram matrices."""
    eps = (xs - ds) / sigmas[:, None]
    G, H, n = xs @ xs.T, eps @ xs.T, xs.shape[1]  # H[i, j] = <eps_i, x_j>
    c = sigmas[None, :] - sigmas[:, None]  # c[i, j] = sigma_j - sigma_i
    diff2 = G.diagonal()[:, None] + G.diagonal()[None, :] - 2 * G  # |x_i - x_j|^2
    cross = H.diagonal()[:, None] - H  # <x_i - x_j, eps_i>
    sq = diff2 + 2 * c * cross + c**2 * (eps * eps).sum(1)[:, None]
    cost = (sq.clamp(min=0) / n).sqrt()
    return torch.where(torch.ones_like(cost, dtype=torch.bool).triu(1), cost, torch.full_like(cost, torch.inf))


def best_path(cost: torch.Tensor, num_edges: int) -> list[int]:
    """The path 0 -> M-1 through num_edges edges of least total cost (dynamic programming over [M, M] costs)."""
    M = cost.shape[0]
    if not 1 <= num_edges <= M - 1:
        raise ValueError(f"cannot take {num_edges} steps through {M} levels")
    best = cost[0].clone()  # best[j]: least cost 0 -> j in k edges
    parents = []
    for _ in range(num_edges - 1):
        total = best[:, None] + cost
        best, arg = total.min(0)
        parents.append(arg)
    path = [M - 1]
    for arg in reversed(parents):
        path.append(int(arg[path[-1]]))
    return [0] + path[::-1]


def _family(num_steps: int, sigma_min: float, sigma_max: float, s1: float, s2: float) -> torch.Tensor:
    """sigma_max, then num_steps - 2 levels even in log sigma from s1 to s2, then sigma_min."""
    inner = torch.linspace(math.log(s1), math.log(s2), num_steps - 2, dtype=torch.float64).exp()
    return torch.cat([torch.tensor([sigma_max], dtype=torch.float64), inner, torch.tensor([sigma_min],
                                                                                         dtype=torch.float64)])


def _fit(solve: Callable, latents: torch.Tensor, target: torch.Tensor, start: torch.Tensor, num_steps: int,
         sigma_min: float, sigma_max: float) -> torch.Tensor:
    """Levels minimising the RMS end-point error of `solve` on the pilots: a search of the family, then a polish."""
    zero = torch.zeros(1, dtype=torch.float64)

    def error(levels: torch.Tensor) -> float:
        if not (levels[1:] < levels[:-1]).all():
            return math.inf
        sigmas = torch.cat([levels, zero]).to(latents.device)
        err = (solve(latents * sigmas[0], sigmas) - target).square().mean().sqrt().item()
        return err if math.isfinite(err) else math.inf

    best, best_err = start, error(start)
    if num_steps >= 4:
        for s1 in torch.logspace(math.log10(0.3), math.log10(min(30.0, sigma_max / 1.5)), 9).tolist():
            for s2 in torch.logspace(math.log10(max(0.01, sigma_min * 3)), math.log10(1.0), 9).tolist():
                if s2 < s1:
                    levels = _family(num_steps, sigma_min, sigma_max, s1, s2)
                    err = error(levels)
                    if err < best_err:
                        best, best_err = levels, err
    for factor in (1.3, 1.1):  # polish: move one level at a time, in log sigma
        for _ in range(2):
            for i in range(1, num_steps - 1):
                for f in (factor, 1 / factor):
                    levels = best.clone()
                    levels[i] *= f
                    err = error(levels)
                    if err < best_err:
                        best, best_err = levels, err
    return best


def optimized_steps(denoise: Callable, num_steps: int, *, shape: tuple[int, ...], sigma_min: float = 0.002,
                    sigma_max: float = 80.0, pilots: int = 16, fine_steps: int = 256, seed: int = 0,
                    device: torch.device | str = "cpu", cache: str | os.PathLike | None = None,
                    solve: Callable | None = None, solver_key: str = "") -> torch.Tensor:
    """num_steps levels from sigma_max to sigma_min fitted to `denoise(x, sigma)` (scaled state), then 0; float64.

    `solve(x_hat, sigmas) -> end point` (optional) is the solver the steps are for; `solver_key` names it
    in the cache.
    """
    if int(num_steps) != num_steps or num_steps < 2:
        raise ValueError(f"the optimized discretization needs num_steps >= 2, got {num_steps}")
    key = f"steps={num_steps} sigma=[{sigma_min:.6g},{sigma_max:.6g}] pilots={pilots} fine={fine_steps} seed={seed}" \
          f" shape={list(shape)}" + (f" fit={solver_key}" if solve is not None else "")
    stored = json.loads(Path(cache).read_text()) if cache is not None and Path(cache).is_file() else {}
    if key in stored:
        return torch.tensor(stored[key] + [0.0], dtype=torch.float64, device=device)
    ramp = torch.linspace(0, 1, fine_steps, dtype=torch.float64, device=device)
    a, b = sigma_max ** (1 / 7), sigma_min ** (1 / 7)
    fine = (a + ramp * (b - a)) ** 7
    g = torch.Generator(device=device).manual_seed(seed)
    latents = torch.randn(pilots, *shape, generator=g, dtype=torch.float64, device=device)
    with torch.no_grad():
        xs, ds = _pilots(lambda x, s: denoise(x, s).to(torch.float64), fine, latents)
    levels = fine[best_path(trajectory_costs(fine, xs, ds), num_steps - 1)].cpu()
    if solve is not None:
        with torch.no_grad():
            levels = _fit(solve, latents, ds[-1].reshape(latents.shape), levels, num_steps, sigma_min, sigma_max)
    sigmas = levels.tolist()
    if cache is not None:
        stored[key] = sigmas
        with atomic_write(cache, "w") as f:
            json.dump(stored, f, indent=1)
    return torch.tensor(sigmas + [0.0], dtype=torch.float64, device=device)
