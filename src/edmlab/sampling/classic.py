"""The classic solvers: Euler, Heun and EDM's churn in the process's own t; DDIM, DDPM ancestral, Euler-Maruyama.

Euler, Heun and Euler-Maruyama step in the state x = s(t) x_hat and the time t of
the given process (EDM Algorithms 1 and 2; Song et al. 2021); the others are
process-free, in the scaled ODE d x_hat / d sigma = (x_hat - D) / sigma.
"""

from __future__ import annotations

import math

import torch

from edmlab.process import NoiseProcess
from edmlab.sampling.registry import Callback, Context, Denoise, Step, register


def _pf_ode(proc: NoiseProcess, D: Denoise, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """dx/dt = (sigma'/sigma + s'/s) x - (s sigma'/sigma) D(x/s; sigma) (EDM eq. 4 with the score through D), and D."""
    s, sigma, sigma_d = proc.s(t), proc.sigma(t), proc.sigma_deriv(t)
    denoised = D(x / s, sigma)
    return (sigma_d / sigma + proc.s_deriv(t) / s) * x - sigma_d * s / sigma * denoised, denoised


def _runge_kutta(D, x_hat, sigmas, callback, ctx, *, order: int, S_churn: float, S_tmin: float, S_tmax: float,
                 S_noise: float, draw_always: bool) -> torch.Tensor:
    """Euler (order 1) or Heun (order 2) in the process's t, with optional churn (EDM Algorithms 1 and 2)."""
    proc, round_sigma = ctx.process, ctx.round_sigma
    t_steps = proc.sigma_inv(sigmas)
    x = x_hat * proc.s(t_steps[0])
    N = len(t_steps) - 1
    for i in range(N):
        t_cur, t_next = t_steps[i], t_steps[i + 1]
        sigma_cur = proc.sigma(t_cur)
        gamma = min(S_churn / N, math.sqrt(2) - 1) if S_tmin <= sigma_cur <= S_tmax else 0.0
        eps = ctx.noise(x) if draw_always or gamma > 0 else None
        t_hat = t_cur
        if gamma > 0:  # raise the noise level to sigma_hat, in scaled coordinates
            sigma_hat = round_sigma(sigma_cur * (1 + gamma))
            t_hat = proc.sigma_inv(sigma_hat)
            s_hat = proc.s(t_hat)
            x = s_hat / proc.s(t_cur) * x + s_hat * (sigma_hat**2 - sigma_cur**2).clamp(min=0).sqrt() * S_noise * eps
        s_hat, sigma_hat = proc.s(t_hat), proc.sigma(t_hat)
        if i == N - 1:  # the last step, into sigma = 0: the denoised state itself
            x_hat = D(x / s_hat, sigma_hat)
            callback(Step(i, sigma_hat, sigmas[i + 1], x / s_hat, x_hat))
            return x_hat
        h = t_next - t_hat
        d, denoised = _pf_ode(proc, D, x, t_hat)
        callback(Step(i, sigma_hat, sigmas[i + 1], x / s_hat, denoised))
        x_next = x + h * d
        if order == 2:
            x_next = x + h * (d + _pf_ode(proc, D, x_next, t_next)[0]) / 2
        x = x_next
    return x / proc.s(t_steps[-1])


@register("euler")
def euler(D: Denoise, x: torch.Tensor, sigmas: torch.Tensor, callback: Callback, ctx: Context, *,
          S_churn: float = 0.0, S_tmin: float = 0.0, S_tmax: float = math.inf, S_noise: float = 1.0) -> torch.Tensor:
    """Euler on the probability-flow ODE in the process's t (EDM Table 1's VP/VE baselines), optional churn."""
    return _runge_kutta(D, x, sigmas, callback, ctx, order=1, S_churn=S_churn, S_tmin=S_tmin, S_tmax=S_tmax,
                        S_noise=S_noise, draw_always=False)


@register("heun")
def heun(D: Denoise, x: torch.Tensor, sigmas: torch.Tensor, callback: Callback, ctx: Context, *,
         S_churn: float = 0.0, S_tmin: float = 0.0, S_tmax: float = math.inf, S_noise: float = 1.0) -> torch.Tensor:
    """Heun's 2nd-order method, last step Euler (EDM Algorithm 1; N steps cost 2N - 1 NFE), optional churn."""
    return _runge_kutta(D, x, sigmas, callback, ctx, order=2, S_churn=S_churn, S_tmin=S_tmin, S_tmax=S_tmax,
                        S_noise=S_noise, draw_always=False)


@register("edm_stochastic")
def edm_stochastic(D: Denoise, x: torch.Tensor, sigmas: torch.Tensor, callback: Callback, ctx: Context, *,
                   S_churn: float = 0.0, S_tmin: float = 0.0, S_tmax: float = math.inf,
                   S_noise: float = 1.0) -> torch.Tensor:
    """EDM Algorithm 2: Heun with churn; draws noise on every step, as EDM's edm_sampler does."""
    return _runge_kutta(D, x, sigmas, callback, ctx, order=2, S_churn=S_churn, S_tmin=S_tmin, S_tmax=S_tmax,
                        S_noise=S_noise, draw_always=True)


@register("ddim")
def ddim(D: Denoise, x: torch.Tensor, sigmas: torch.Tensor, callback: Callback, ctx: Context) -> torch.Tensor:
    """DDIM = Euler in sigma on the scaled ODE d x_hat / d sigma = (x_hat - D)/sigma (EDM Sec. 3)."""
    for i, (sigma, sigma_next) in enumerate(zip(sigmas[:-1], sigmas[1:], strict=True)):
        denoised = D(x, sigma)
        callback(Step(i, sigma, sigma_next, x, denoised))
        x = x + (sigma_next - sigma) * (x - denoised) / sigma
    return x


@register("euler_maruyama")
def euler_maruyama(D: Denoise, x: torch.Tensor, sigmas: torch.Tensor, callback: Callback,
                   ctx: Context) -> torch.Tensor:
    """Euler-Maruyama on the reverse SDE dx = [f x - g^2 grad log p_t(x)] dt + g dw (Song et al. 2021, eq. 6)."""
    proc = ctx.process
    t_steps = proc.sigma_inv(sigmas)
    x = x * proc.s(t_steps[0])
    for i, (t, t_next) in enumerate(zip(t_steps[:-2], t_steps[1:-1], strict=True)):
        s, sigma = proc.s(t), proc.sigma(t)
        denoised = D(x / s, sigma)
        callback(Step(i, sigma, sigmas[i + 1], x / s, denoised))
        score = (s * denoised - x) / (s * sigma) ** 2
        g = proc.g(t)
        x = x + (t_next - t) * (proc.f(t) * x - g**2 * score) + g * (t - t_next).sqrt() * ctx.noise(x)
    s, sigma = proc.s(t_steps[-2]), proc.sigma(t_steps[-2])
    x_hat = D(x / s, sigma)
    callback(Step(len(sigmas) - 2, sigma, sigmas[-1], x / s, x_hat))
    return x_hat


@register("ddpm_ancestral")
def ddpm_ancestral(D: Denoise, x: torch.Tensor, sigmas: torch.Tensor, callback: Callback,
                   ctx: Context) -> torch.Tensor:
    """Ancestral sampling: draw x_hat at sigma' from q(x_hat' | x_hat, x_0 = D) (Ho et al. 2020, eq. 7, scaled)."""
    for i, (sigma, sigma_next) in enumerate(zip(sigmas[:-1], sigmas[1:], strict=True)):
        x0 = D(x, sigma)
        callback(Step(i, sigma, sigma_next, x, x0))
        ratio = sigma_next**2 / sigma**2
        x = x0 + ratio * (x - x0) + (sigma_next**2 * (1 - ratio)).sqrt() * ctx.noise(x)
    return x
