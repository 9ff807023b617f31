"""Discretizations: the noise levels sigma_0 > ... > sigma_{N-1} > sigma_N = 0 a solver visits.

`sigma_steps` holds the closed-form discretizations of EDM Table 1; `ays_steps` the
published Align-Your-Steps sets; steps fitted to a denoiser live in
`edmlab.sampling.optimize`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import torch

from edmlab import process as processes
from edmlab.process import VP, NoiseProcess

__all__ = ["sigma_steps", "ays_steps", "DISCRETIZATIONS", "AYS_SIGMAS"]

DISCRETIZATIONS = ("edm", "vp", "ve", "iddpm", "uniform_t")


def _check_name(what: str, name: str, valid: Sequence[str]) -> None:
    if name not in valid:
        raise ValueError(f"unknown {what} {name!r}; valid names: {', '.join(valid)}")


def _default_range(discretization: str, process: NoiseProcess, epsilon_s: float) -> tuple[float, float]:
    """EDM's ablation-sampler defaults for (sigma_min, sigma_max) per discretization."""
    vp = VP()
    return {"edm": (0.002, 80.0), "vp": (vp.sigma(epsilon_s), vp.sigma(1.0)), "ve": (0.02, 100.0),
            "iddpm": (0.002, 81.0), "uniform_t": (process.sigma_min, process.sigma_max)}[discretization]


@functools.lru_cache(maxsize=8)
def _iddpm_table(M: int, C_1: float, C_2: float) -> torch.Tensor:
    """The iDDPM table as NVlabs' generate.py builds it: alpha_bar of an int64 j in float32, u in float64."""
    alpha_bar = lambda j: (0.5 * math.pi * j / M / (C_2 + 1)).sin() ** 2  # noqa: E731 - per 0-dim tensor, as theirs
    u = torch.zeros(M + 1, dtype=torch.float64)
    for j in torch.arange(M, 0, -1):
        u[j - 1] = ((u[j] ** 2 + 1) / (alpha_bar(j - 1) / alpha_bar(j)).clip(min=C_1) - 1).sqrt()
    return u


def sigma_steps(discretization: str, num_steps: int, *, sigma_min: float | None = None,
                sigma_max: float | None = None, rho: float = 7.0, process: str | NoiseProcess = "edm",
                round_sigma: Callable[[torch.Tensor], torch.Tensor] | None = None, epsilon_s: float = 1e-3,
                M: int = 1000, C_1: float = 0.001, C_2: float = 0.008) -> torch.Tensor:
    """The noise levels sigma_0 > ... > sigma_{N-1} > sigma_N = 0 (EDM Table 1, "time steps"), float64."""
    _check_name("discretization", discretization, DISCRETIZATIONS)
    if int(num_steps) != num_steps or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps}")
    proc = processes.get(process)
    lo, hi = _default_range(discretization, proc, epsilon_s)
    sigma_min = lo if sigma_min is None else float(sigma_min)
    sigma_max = hi if sigma_max is None else float(sigma_max)
    if not 0 < sigma_min < sigma_max < math.inf:
        raise ValueError(f"need 0 < sigma_min < sigma_max < inf, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    i = torch.arange(num_steps, dtype=torch.float64) / max(num_steps - 1, 1)
    if discretization == "edm":  # EDM eq. 5
        a, b = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
        sigmas = (a + i * (b - a)) ** rho
    elif discretization == "vp":  # uniform t in a VP process refitted to [sigma_min, sigma_max]
        beta_d = 2 * (math.log1p(sigma_min**2) / epsilon_s - math.log1p(sigma_max**2)) / (epsilon_s - 1)
        sigmas = VP(beta_d, math.log1p(sigma_max**2) - 0.5 * beta_d).sigma(1 + i * (epsilon_s - 1))
    elif discretization == "ve":  # geometric in sigma
        sigmas = sigma_max * (sigma_min / sigma_max) ** i
    elif discretization == "iddpm":  # iDDPM's table, evenly strided
        u = _iddpm_table(M, C_1, C_2)
        u = u[(u >= sigma_min) & (u <= sigma_max)]
        if num_steps > len(u):
            raise ValueError(f"the iddpm discretization has {len(u)} table entries in [{sigma_min:g}, {sigma_max:g}];"
                             f" num_steps={num_steps} would repeat steps")
        step = torch.arange(num_steps, dtype=torch.float64)  # NVlabs' rounding: (L-1)/(N-1) x i, half to even
        sigmas = u[((len(u) - 1) / max(num_steps - 1, 1) * step).round().long()]
    else:  # uniform in the process's own t
        t0, t1 = proc.sigma_inv(sigma_max), proc.sigma_inv(sigma_min)
        sigmas = proc.sigma(t0 + i * (t1 - t0))
    if round_sigma is not None:
        sigmas = round_sigma(sigmas).to(torch.float64)
    return torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)])




# Align Your Steps (Sabour et al. 2024): the published 10-step sets (sigma_0 ... sigma_9; sigma_10 = 0 omitted).
AYS_SIGMAS = {
    "sd15": (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152),
    "sdxl": (14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113),
    "svd": (700.00, 54.5, 15.886, 7.977, 4.248, 1.789, 0.981, 0.403, 0.173, 0.034),
}


def _log_linear(table: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The AYS interpolation: log sigma piecewise linear in the step fraction v in [0, 1]."""
    u = torch.linspace(0, 1, len(table), dtype=torch.float64)
    j = torch.searchsorted(u, v.clamp(0, 1), right=True).clamp(1, len(table) - 1)
    return table[j - 1] + (v - u[j - 1]) / (u[j] - u[j - 1]) * (table[j] - table[j - 1])


def ays_steps(num_steps: int, *, model: str = "svd", sigma_min: float | None = None,
              sigma_max: float | None = None) -> torch.Tensor:
    """A published AYS set, log-linearly interpolated to num_steps levels (the AYS recipe), then 0; float64.

    sigma_min / sigma_max, when given, cut the set's curve to that range (where it extends past it) and pin
    its ends there: the SVD set, whose range is widest, then serves EDM's [0.002, 80].
    """
    _check_name("AYS model", model, tuple(AYS_SIGMAS))
    if int(num_steps) != num_steps or num_steps < 2:
        raise ValueError(f"the ays discretization needs num_steps >= 2, got {num_steps}")
    table = torch.tensor(AYS_SIGMAS[model], dtype=torch.float64).log()
    hi = table[0].exp().item() if sigma_max is None else float(sigma_max)
    lo = table[-1].exp().item() if sigma_min is None else float(sigma_min)
    if not 0 < lo < hi < math.inf:
        raise ValueError(f"need 0 < sigma_min < sigma_max < inf, got sigma_min={lo}, sigma_max={hi}")
    dense = _log_linear(table, torch.linspace(0, 1, 10001, dtype=torch.float64))
    inside = ((dense <= math.log(hi) + 1e-12) & (dense >= math.log(lo) - 1e-12)).nonzero()
    v0, v1 = inside[0].item() / 10000, inside[-1].item() / 10000
    sigmas = _log_linear(table, v0 + (v1 - v0) * torch.linspace(0, 1, num_steps, dtype=torch.float64)).exp()
    sigmas[0], sigmas[-1] = hi, lo
    return torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)])
