"""Exact log-likelihoods from the probability-flow ODE written with s and sigma alone.

Along dx/dt = v(x, t) = (sigma'/sigma + s'/s) x - (s sigma'/sigma) D(x/s; sigma) (EDM eq. 4) the density
obeys the instantaneous change of variables d log p_t(x_t)/dt = -div v (Chen et al. 2018, Theorem 1), and

    div_x v = d (sigma'/sigma + s'/s) - (sigma'/sigma) tr dD/dx_hat,

so that, integrating from t_0 = t(sigma_min) to T = t(sigma_max) and using the prior N(0, s_T^2 sigma_max^2 I),

    log p(x_hat; sigma_min) = log N(x_T; 0, s_T^2 sigma_max^2 I) + d ln(s_T sigma_max / (s_0 sigma_min))
                              - int_{t_0}^T (sigma'/sigma) tr dD/dx_hat dt + d ln s_0.

The first part is in closed form; the trace integral rides along the state in a fixed-grid RK4 in the
process's t (the grid is uniform in ln sigma). The result is the density of the scaled state, so every
process gives the same value up to the integrator's error. The trace is exact (one backward pass per
dimension) or Hutchinson's eps^T (dD/dx_hat) eps with one probe per sample held fixed along the path,
which is unbiased for the same grid (Grathwohl et al. 2019).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from edmlab import process as processes
from edmlab.generation.seeds import SeedGenerator
from edmlab.process import NoiseProcess

__all__ = ["log_likelihood", "bits_per_dim", "dequantize", "hutchinson_probes", "image_bits_per_dim", "DIVERGENCES"]

Generator = torch.Generator | Sequence[torch.Generator] | None
DIVERGENCES = ("exact", "hutchinson")
PROBES = ("rademacher", "gaussian")


def hutchinson_probes(shape: Sequence[int], generator: Generator = None, kind: str = "rademacher",
                      dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu") -> torch.Tensor:
    """Probes with E[eps eps^T] = I; a list of generators draws item k from generator k (per-seed probes)."""
    if kind not in PROBES:
        raise ValueError(f"unknown probe {kind!r}; valid names: {', '.join(PROBES)}")
    gens = list(generator) if isinstance(generator, Sequence) else None
    if gens is not None and len(gens) != shape[0]:
        raise ValueError(f"got {len(gens)} generators for {shape[0]} samples; pass one per sample")

    def draw(item_shape, g):
        if kind == "gaussian":
            return torch.randn(item_shape, generator=g, dtype=dtype, device=device)
        return torch.randint(0, 2, item_shape, generator=g, device=device).to(dtype) * 2 - 1

    if gens is None:
        return draw(tuple(shape), generator)
    return torch.stack([draw(tuple(shape[1:]), g) for g in gens])


def _trace_exact(D: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """tr dD/dx_hat per item, one backward pass per dimension (items are independent)."""
    flat = D.flatten(1)
    trace = torch.zeros(D.shape[0], dtype=torch.float64, device=D.device)
    for j in range(flat.shape[1]):
        (grad,) = torch.autograd.grad(flat[:, j].sum(), x_hat, retain_graph=True)
        trace += grad.flatten(1)[:, j].to(torch.float64)
    return trace


def _trace_hutchinson(D: torch.Tensor, x_hat: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """eps^T (dD/dx_hat) eps per item: one vector-Jacobian product."""
    (grad,) = torch.autograd.grad(D, x_hat, grad_outputs=eps.to(D.dtype))
    return (grad.to(torch.float64) * eps).flatten(1).sum(1)


def log_likelihood(denoiser: Callable, x: torch.Tensor, *, process: str | NoiseProcess = "edm",
                   sigma_min: float = 0.002, sigma_max: float = 80.0, divergence: str = "exact",
                   num_steps: int = 128, class_labels: torch.Tensor | None = None, generator: Generator = None,
                   probe: str = "rademacher", return_latents: bool = False):
    """log p(x; sigma_min) in nats per sample ([N], float64) of the model whose denoiser is `denoiser`.

    `x` is the (scaled) data, e.g. images in [-1, 1]; `num_steps` RK4 steps cost 4 denoiser evaluations
    each (and, with divergence="exact", one backward pass per dimension per evaluation). With
    return_latents=True also returns x_T / s_T, the ODE's image of x at sigma_max.
    """
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; valid names: {', '.join(DIVERGENCES)}")
    if not 0 < sigma_min < sigma_max < math.inf:
        raise ValueError(f"need 0 < sigma_min < sigma_max < inf, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    if int(num_steps) != num_steps or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps}")
    if not torch.isfinite(x).all():
        raise ValueError("x contains NaN or Inf")
    proc = processes.get(process)
    d = x[0].numel()
    sigmas = torch.exp(torch.linspace(math.log(sigma_min), math.log(sigma_max), int(num_steps) + 1,
                                      dtype=torch.float64))
    t_steps = proc.sigma_inv(sigmas).to(x.device)
    eps = hutchinson_probes(x.shape, generator, probe, device=x.device) if divergence == "hutchinson" else None

    def rhs(x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(v(x, t), -(sigma'/sigma) tr dD/dx_hat): the state's velocity and the trace term's integrand."""
        s, sigma, sigma_d = proc.s(t), proc.sigma(t), proc.sigma_deriv(t)
        with torch.enable_grad():
            x_hat = (x_t / s).detach().requires_grad_(True)
            D = denoiser(x_hat, sigma, class_labels=class_labels)
            trace = _trace_exact(D, x_hat) if eps is None else _trace_hutchinson(D, x_hat, eps)
        D = D.detach().to(torch.float64)
        v = (sigma_d / sigma + proc.s_deriv(t) / s) * x_t - sigma_d * s / sigma * D
        return v, -sigma_d / sigma * trace

    x_t = x.to(torch.float64) * proc.s(t_steps[0])
    integral = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    for t, t_next in zip(t_steps[:-1], t_steps[1:], strict=True):  # classical RK4 on (x, integral)
        h = t_next - t
        v1, a1 = rhs(x_t, t)
        v2, a2 = rhs(x_t + h / 2 * v1, t + h / 2)
        v3, a3 = rhs(x_t + h / 2 * v2, t + h / 2)
        v4, a4 = rhs(x_t + h * v3, t_next)
        x_t = x_t + h / 6 * (v1 + 2 * v2 + 2 * v3 + v4)
        integral = integral + h / 6 * (a1 + 2 * a2 + 2 * a3 + a4)
    s_0, s_T = proc.s(t_steps[0]), proc.s(t_steps[-1])
    prior_std = s_T * sigma_max
    log_prior = -0.5 * (x_t / prior_std).flatten(1).square().sum(1) - d * (0.5 * math.log(2 * math.pi)
                                                                          + prior_std.log())
    log_p = log_prior + d * (s_T * sigma_max / (s_0 * sigma_min)).log() + integral + d * s_0.log()
    return (log_p, (x_t / s_T).to(x.dtype)) if return_latents else log_p


def dequantize(pixels: torch.Tensor, generator: Generator = None) -> torch.Tensor:
    """8-bit pixels u in {0..255} -> (u + U(-1/2, 1/2)) / 127.5 - 1: uniform noise over each bin of the data scale."""
    u = torch.as_tensor(pixels).to(torch.float64)
    if u.min() < 0 or u.max() > 255:
        raise ValueError(f"dequantize expects 8-bit pixel values in [0, 255], got [{u.min():g}, {u.max():g}]")
    if isinstance(generator, Sequence):
        noise = torch.stack([torch.rand(u.shape[1:], generator=g, dtype=torch.float64, device=u.device)
                             for g in generator])
    else:
        noise = torch.rand(u.shape, generator=generator, dtype=torch.float64, device=u.device)
    return (u + noise - 0.5) / 127.5 - 1


def bits_per_dim(log_p: torch.Tensor, dim: int, bin_width: float = 1 / 127.5) -> torch.Tensor:
    """-log2 P(u) / d for 8-bit data: the dequantized density's bound log P >= log p(x) + d ln(bin_width)."""
    return -(log_p + dim * math.log(bin_width)) / (dim * math.log(2))


def image_bits_per_dim(denoiser: Callable, pixels: torch.Tensor, labels: torch.Tensor | None = None, *,
                       seeds: Sequence[int] | None = None, batch_size: int = 64,
                       progress: Callable[[int], None] | None = None, **ode) -> dict[str, torch.Tensor]:
    """Per image: dequantized log-likelihood (nats) and bits/dim of 8-bit `pixels` [N, C, H, W].

    Image i draws its dequantization noise and then its Hutchinson probe from its own generator (`SeedGenerator`,
    seeds[i], default i), so its value does not depend on the batch. `ode` goes to `log_likelihood`;
    `progress(n)` is called after each batch of n images.
    """
    seeds = list(range(len(pixels))) if seeds is None else [int(s) for s in seeds]
    if len(seeds) != len(pixels):
        raise ValueError(f"got {len(seeds)} seeds for {len(pixels)} images; pass one per image")
    params = list(denoiser.parameters()) if isinstance(denoiser, torch.nn.Module) else []
    device = params[0].device if params else pixels.device
    log_p = []
    for lo in range(0, len(pixels), batch_size):
        gens = SeedGenerator(seeds[lo:lo + batch_size], device).generators
        x = dequantize(pixels[lo:lo + batch_size].to(device), gens)
        y = None if labels is None else labels[lo:lo + batch_size].to(device)
        log_p.append(log_likelihood(denoiser, x, class_labels=y, generator=gens, **ode).cpu())
        if progress is not None:
            progress(len(gens))
    log_p_all = torch.cat(log_p)
    return {"log_p": log_p_all, "bits_per_dim": bits_per_dim(log_p_all, pixels[0].numel())}
