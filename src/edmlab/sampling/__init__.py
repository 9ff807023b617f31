"""Samplers: noise-level steps and solvers of the probability-flow ODE and the reverse SDE.

Every solver integrates the process-independent law fixed by one denoiser D;
the process (s, sigma) only sets the time variable t some solvers step in.
Steps (`edmlab.sampling.steps`, `edmlab.sampling.optimize`) are separate from
solvers (`SOLVERS`, one signature: `edmlab.sampling.registry`), every solver ends
with the step to sigma = 0, which is the denoiser output itself, and `sample` is
a pure function: no scheduler state.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch

from edmlab import process as processes
from edmlab.guidance import guided
from edmlab.precond import DenoiserLike, check_denoiser
from edmlab.process import NoiseProcess
from edmlab.sampling import classic  # noqa: F401  (importing registers the solvers: EDM's first)

# isort: split
from edmlab.sampling import adams, adaptive, dpm, unipc  # noqa: F401
from edmlab.sampling.optimize import optimized_steps
from edmlab.sampling.registry import SOLVERS, Callback, Context, Solver, Step, register, solver_options
from edmlab.sampling.steps import AYS_SIGMAS, DISCRETIZATIONS, _check_name, _default_range, ays_steps, sigma_steps

__all__ = ["sample", "sigma_steps", "ays_steps", "optimized_steps", "register", "SOLVERS", "DISCRETIZATIONS",
           "ALL_DISCRETIZATIONS", "AYS_SIGMAS", "Context", "Solver", "Step"]

Generator = torch.Generator | Sequence[torch.Generator] | None
DenoiseFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# Discretizations beyond the closed forms of `sigma_steps`: published AYS sets, and steps fitted to the denoiser.
ALL_DISCRETIZATIONS = DISCRETIZATIONS + ("ays", "optimized")
STEP_OPTIONS = {  # options of each discretization (everything else goes to the solver)
    "vp": ("epsilon_s",), "iddpm": ("M", "C_1", "C_2"), "ays": ("ays_model",),
    "optimized": ("pilots", "fine_steps", "search_seed", "fit", "steps_cache"),
}


def _refuse_unknown_keys(options: dict[str, Any]) -> None:
    """A key no solver or discretization takes (a typo such as num_step) is named with every valid key."""
    known = {k for keys in STEP_OPTIONS.values() for k in keys} | {k for s in SOLVERS.values() for k in s.options}
    unknown = sorted(set(options) - known)
    if unknown:
        own = [k for k in inspect.signature(sample).parameters if k not in ("denoiser", "latents", "options")]
        raise TypeError(f"unknown sampler key(s) {', '.join(unknown)}; valid keys: {', '.join(own + sorted(known))}")


def _randn_like(x: torch.Tensor, generator: Generator) -> torch.Tensor:
    """Unit Gaussian noise like x; a list of generators draws item k from generator k (per-seed streams)."""
    if isinstance(generator, Sequence):
        return torch.stack([torch.randn(x.shape[1:], generator=g, dtype=x.dtype, device=x.device) for g in generator])
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)


def _analytic_first(D: DenoiseFn, data_mean, data_std: float | None) -> DenoiseFn:
    """D whose first call is the Gaussian-data denoiser mean + std^2/(std^2+sigma^2)(x - mean), at no NFE.

    At sigma_max = 80 the posterior mean is the data mean up to O(std^2/sigma^2): one network call saved
    (the analytic first step of Dockhorn et al. 2023 / Zhou et al. 2024). std None: the mean alone.
    """
    first = True

    def wrapped(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        nonlocal first
        if not first:
            return D(x, sigma)
        first = False
        mean = torch.as_tensor(data_mean, dtype=torch.float64, device=x.device)
        if data_std is None:
            return mean.expand_as(x).clone()
        return mean + data_std**2 / (data_std**2 + sigma**2) * (x - mean)

    return wrapped


@torch.no_grad()
def sample(denoiser: DenoiserLike, latents: torch.Tensor, *, solver: str = "heun", num_steps: int = 18,
           discretization: str = "edm", process: str | NoiseProcess = "edm", sigma_min: float | None = None,
           sigma_max: float | None = None, rho: float = 7.0, class_labels: torch.Tensor | None = None,
           generator: Generator = None, return_nfe: bool = False, callback: Callback | None = None,
           analytic_first_step: bool = False, data_mean: Any = 0.0, data_std: float | None = None,
           guidance: float = 1.0, guide: DenoiserLike | None = None,
           guidance_interval: Sequence[float] | None = None, **options):
    """Draw samples by integrating from unit-Gaussian `latents` (scaled to the first step) down to sigma = 0.

    `options` are the solver's (e.g. S_churn for euler/heun/edm_stochastic, order/variant for unipc:
    `SOLVERS[name].options`) and the discretization's (STEP_OPTIONS); any other name is refused. `callback(Step)`
    sees every step. `analytic_first_step` replaces the first network call by the data mean (and
    `data_std`, when given, by the Gaussian posterior mean). The state is float64 (as in EDM's
    sampler); the result has the dtype of `latents`. Steps are clamped to the denoiser's
    [sigma_min, sigma_max] and rounded by its `round_sigma` (EDM's edm_sampler).
    `guidance` w integrates D_w = G + w (D - G) (edmlab.guidance): G is the network without labels when
    `guide` is None (classifier-free), else `guide`; `guidance_interval` limits w to (sigma_lo, sigma_hi].
    The NFE counts denoiser calls: a classifier-free call is one forward of a doubled batch.
    """
    check_denoiser(denoiser, "sample")
    denoiser = guided(denoiser, guidance, guide=guide, interval=guidance_interval)
    _check_name("solver", solver, tuple(SOLVERS))
    proc = processes.get(process)
    if not torch.isfinite(latents).all():
        raise ValueError("latents contain NaN or Inf")
    _check_name("discretization", discretization, ALL_DISCRETIZATIONS)
    _refuse_unknown_keys(options)
    step_keys = STEP_OPTIONS.get(discretization, ())
    solver_opts = solver_options(solver, {k: v for k, v in options.items() if k not in step_keys})
    step_opts = {k: v for k, v in options.items() if k in step_keys}
    round_sigma = denoiser.round_sigma
    closed_form = discretization in DISCRETIZATIONS
    lo, hi = _default_range(discretization if closed_form else "edm", proc, step_opts.get("epsilon_s", 1e-3))
    sigma_min = max(lo if sigma_min is None else sigma_min, denoiser.sigma_min)
    sigma_max = min(hi if sigma_max is None else sigma_max, denoiser.sigma_max)

    nfe = 0

    def D(x_hat: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        nonlocal nfe
        nfe += 1
        return denoiser(x_hat, sigma, class_labels=class_labels).to(torch.float64)

    if closed_form:
        sigmas = sigma_steps(discretization, num_steps, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho,
                             process=proc, round_sigma=round_sigma, **step_opts)
    else:
        if discretization == "ays":
            sigmas = ays_steps(num_steps, model=step_opts.get("ays_model", "svd"), sigma_min=sigma_min,
                               sigma_max=sigma_max)
        else:
            sigmas = _fitted_steps(denoiser, latents, num_steps, sigma_min, sigma_max, class_labels, solver,
                                   solver_opts, (analytic_first_step, data_mean, data_std), **step_opts)
        sigmas = torch.cat([round_sigma(sigmas[:-1].to(latents.device)).to(torch.float64).cpu(), sigmas[-1:].cpu()])
    sigmas = sigmas.to(latents.device)

    denoise = _analytic_first(D, data_mean, data_std) if analytic_first_step else D
    ctx = Context(process=proc, noise=lambda x: _randn_like(x, generator), round_sigma=round_sigma)
    x_hat = latents.to(torch.float64) * sigmas[0]
    x = SOLVERS[solver].fn(denoise, x_hat, sigmas, callback or (lambda step: None), ctx, **solver_opts)
    x = x.to(latents.dtype)
    return (x, nfe) if return_nfe else x


def _fitted_steps(denoiser: DenoiserLike, latents: torch.Tensor, num_steps: int, sigma_min: float, sigma_max: float,
                  class_labels, solver: str, solver_opts: dict, first_step: tuple, *, pilots: int = 32,
                  fine_steps: int = 256, search_seed: int = 0, fit: bool = True,
                  steps_cache: str | os.PathLike | None = None) -> torch.Tensor:
    """The `optimized` steps for this denoiser and solver: pilots from search_seed (labels: the batch's first)."""
    labels = None if class_labels is None else class_labels[:1].expand(pilots, *class_labels.shape[1:])

    def denoise(x, sigma):
        return denoiser(x.to(latents.dtype), sigma, class_labels=labels).to(torch.float64)

    analytic, mean, std = first_step
    g = torch.Generator(device=latents.device).manual_seed(search_seed)
    ctx = Context(processes.get("edm"), noise=lambda x: _randn_like(x, g), round_sigma=lambda s: s)

    def solve(x_hat: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
        g.manual_seed(search_seed + 1)
        D = _analytic_first(denoise, mean, std) if analytic else denoise
        return SOLVERS[solver].fn(D, x_hat, sigmas, lambda step: None, ctx, **solver_opts)

    key = f"{solver}{sorted(solver_opts.items())} first_step={analytic}"
    return optimized_steps(denoise, num_steps, shape=tuple(latents.shape[1:]), sigma_min=sigma_min,
                           sigma_max=sigma_max, pilots=pilots, fine_steps=fine_steps, seed=search_seed,
                           device=latents.device, cache=steps_cache, solve=solve if fit else None, solver_key=key)
