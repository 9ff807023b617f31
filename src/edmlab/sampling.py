"""Samplers: time-step grids and solvers of the probability-flow ODE and the reverse SDE.

Every solver integrates the process-independent law fixed by one denoiser D;
the process (s, sigma) only sets the time variable t the solver steps in
(DESIGN.md 1). Grids (`sigma_steps`) are separate from solvers, every solver
ends with the step to sigma = 0, which is the denoiser output itself, and
`sample` is a pure function: no scheduler state.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Sequence

import torch

from edmlab import process as processes
from edmlab.process import VP, NoiseProcess

__all__ = ["sample", "sigma_steps", "SOLVERS", "DISCRETIZATIONS"]

Generator = torch.Generator | Sequence[torch.Generator] | None
DenoiseFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

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


def _randn_like(x: torch.Tensor, generator: Generator) -> torch.Tensor:
    """Unit Gaussian noise like x; a list of generators draws item k from generator k (per-seed streams)."""
    if isinstance(generator, Sequence):
        return torch.stack([torch.randn(x.shape[1:], generator=g, dtype=x.dtype, device=x.device) for g in generator])
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)


def _pf_ode(proc: NoiseProcess, D: DenoiseFn, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """dx/dt = (sigma'/sigma + s'/s) x - (s sigma'/sigma) D(x/s; sigma) (EDM eq. 4 with the score through D)."""
    s, sigma, sigma_d = proc.s(t), proc.sigma(t), proc.sigma_deriv(t)
    return (sigma_d / sigma + proc.s_deriv(t) / s) * x - sigma_d * s / sigma * D(x / s, sigma)


def _denoise(proc: NoiseProcess, D: DenoiseFn, x: torch.Tensor, t: torch.Tensor, t_end: torch.Tensor):
    """The last step, into sigma(t_end) = 0: the denoised state s(t_end) D(x/s(t); sigma(t))."""
    return proc.s(t_end) * D(x / proc.s(t), proc.sigma(t))


def _runge_kutta(D, x, t_steps, proc, noise, *, order: int, S_churn: float, S_tmin: float, S_tmax: float,
                 S_noise: float, round_sigma, draw_always: bool):
    """Euler (order 1) or Heun (order 2) in the process's t, with optional churn (EDM Algorithms 1 and 2)."""
    N = len(t_steps) - 1
    for i in range(N):
        t_cur, t_next = t_steps[i], t_steps[i + 1]
        sigma_cur = proc.sigma(t_cur)
        gamma = min(S_churn / N, math.sqrt(2) - 1) if S_tmin <= sigma_cur <= S_tmax else 0.0
        eps = noise(x) if draw_always or gamma > 0 else None
        t_hat = t_cur
        if gamma > 0:  # raise the noise level to sigma_hat, in scaled coordinates
            sigma_hat = round_sigma(sigma_cur * (1 + gamma))
            t_hat = proc.sigma_inv(sigma_hat)
            s_hat = proc.s(t_hat)
            x = s_hat / proc.s(t_cur) * x + s_hat * (sigma_hat**2 - sigma_cur**2).clamp(min=0).sqrt() * S_noise * eps
        if i == N - 1:
            x = _denoise(proc, D, x, t_hat, t_next)
            continue
        h = t_next - t_hat
        d = _pf_ode(proc, D, x, t_hat)
        x_next = x + h * d
        if order == 2:
            x_next = x + h * (d + _pf_ode(proc, D, x_next, t_next)) / 2
        x = x_next
    return x


def _ddim(D, x_hat, sigmas, noise):
    """DDIM = Euler in sigma on the scaled ODE d x_hat / d sigma = (x_hat - D)/sigma (EDM Sec. 3)."""
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:], strict=True):
        x_hat = x_hat + (sigma_next - sigma) * (x_hat - D(x_hat, sigma)) / sigma
    return x_hat


def _ddpm_ancestral(D, x_hat, sigmas, noise):
    """Ancestral sampling: draw x_hat at sigma' from q(x_hat' | x_hat, x_0 = D) (Ho et al. 2020, eq. 7, scaled)."""
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:], strict=True):
        x0 = D(x_hat, sigma)
        ratio = sigma_next**2 / sigma**2
        x_hat = x0 + ratio * (x_hat - x0) + (sigma_next**2 * (1 - ratio)).sqrt() * noise(x_hat)
    return x_hat


def _dpmpp_2m(D, x_hat, sigmas, noise):
    """DPM-Solver++(2M) in lambda = -ln sigma (Lu et al. 2022, Algorithm 2); first-order at both ends."""
    x0_prev, h_prev = None, None
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:], strict=True):
        x0 = D(x_hat, sigma)
        if sigma_next == 0:
            x_hat = x0
            break
        h = (sigma / sigma_next).log()
        if h == 0:  # a repeated level (e.g. snapped by round_sigma) is no step
            continue
        x0_mix = x0 if x0_prev is None else x0 + (x0 - x0_prev) * h / (2 * h_prev)
        x_hat = sigma_next / sigma * x_hat - torch.expm1(-h) * x0_mix
        x0_prev, h_prev = x0, h
    return x_hat


def _euler_maruyama(D, x, t_steps, proc, noise):
    """Euler-Maruyama on the reverse SDE dx = [f x - g^2 grad log p_t(x)] dt + g dw (Song et al. 2021, eq. 6)."""
    for t, t_next in zip(t_steps[:-2], t_steps[1:-1], strict=True):
        s, sigma = proc.s(t), proc.sigma(t)
        score = (s * D(x / s, sigma) - x) / (s * sigma) ** 2
        g = proc.g(t)
        x = x + (t_next - t) * (proc.f(t) * x - g**2 * score) + g * (t - t_next).sqrt() * noise(x)
    return _denoise(proc, D, x, t_steps[-2], t_steps[-1])


_GRID_KEYS = ("epsilon_s", "M", "C_1", "C_2")  # sigma_steps' own settings, passed through by sample
SOLVERS = ("euler", "heun", "edm_stochastic", "ddim", "euler_maruyama", "ddpm_ancestral", "dpmpp_2m")
_SCALED = {"ddim": _ddim, "ddpm_ancestral": _ddpm_ancestral, "dpmpp_2m": _dpmpp_2m}  # process-free solvers


@torch.no_grad()
def sample(denoiser, latents: torch.Tensor, *, solver: str = "heun", num_steps: int = 18,
           discretization: str = "edm", process: str | NoiseProcess = "edm", sigma_min: float | None = None,
           sigma_max: float | None = None, rho: float = 7.0, S_churn: float = 0.0, S_tmin: float = 0.0,
           S_tmax: float = math.inf, S_noise: float = 1.0, class_labels: torch.Tensor | None = None,
           generator: Generator = None, return_nfe: bool = False, **grid_params):
    """Draw samples by integrating from unit-Gaussian `latents` (scaled to the first step) down to sigma = 0.

    The state is float64 (as in EDM's sampler); the result has the dtype of
    `latents`. Steps are clamped to the denoiser's [sigma_min, sigma_max] and
    rounded by its `round_sigma` when it has them (EDM's edm_sampler).
    """
    _check_name("solver", solver, SOLVERS)
    unknown = sorted(set(grid_params) - set(_GRID_KEYS))
    if unknown:
        valid = [k for k in inspect.signature(sample).parameters if k not in ("denoiser", "latents", "grid_params")]
        raise TypeError(f"unknown sampler key(s) {', '.join(unknown)}; valid keys: "
                        f"{', '.join(valid + list(_GRID_KEYS))}")
    proc = processes.get(process)
    if not torch.isfinite(latents).all():
        raise ValueError("latents contain NaN or Inf")
    _check_name("discretization", discretization, DISCRETIZATIONS)
    round_sigma = getattr(denoiser, "round_sigma", lambda sigma: sigma)
    lo, hi = _default_range(discretization, proc, grid_params.get("epsilon_s", 1e-3))
    sigma_min = max(lo if sigma_min is None else sigma_min, getattr(denoiser, "sigma_min", 0.0))
    sigma_max = min(hi if sigma_max is None else sigma_max, getattr(denoiser, "sigma_max", math.inf))
    sigmas = sigma_steps(discretization, num_steps, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho,
                         process=proc, round_sigma=round_sigma, **grid_params).to(latents.device)

    nfe = 0

    def D(x_hat: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        nonlocal nfe
        nfe += 1
        return denoiser(x_hat, sigma, class_labels=class_labels).to(torch.float64)

    noise = lambda x: _randn_like(x, generator)
    x_hat = latents.to(torch.float64) * sigmas[0]
    if solver in _SCALED:
        x = _SCALED[solver](D, x_hat, sigmas, noise)
    else:
        t_steps = proc.sigma_inv(sigmas)
        x = x_hat * proc.s(t_steps[0])
        if solver == "euler_maruyama":
            x = _euler_maruyama(D, x, t_steps, proc, noise)
        else:
            x = _runge_kutta(D, x, t_steps, proc, noise, order=1 if solver == "euler" else 2, S_churn=S_churn,
                             S_tmin=S_tmin, S_tmax=S_tmax, S_noise=S_noise, round_sigma=round_sigma,
                             draw_always=solver == "edm_stochastic")
    x = x.to(latents.dtype)
    return (x, nfe) if return_nfe else x
