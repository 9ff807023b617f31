"""Restart sampling, and an error-controlled embedded Runge-Kutta solver for reference solves.

Both work on the scaled ODE d x_hat / d sigma = (x_hat - D) / sigma. The adaptive
solver steps in u = ln sigma, where dx/du = x - D(x; e^u) is smooth and bounded,
with the Bogacki-Shampine 3(2) or Dormand-Prince 5(4) pairs and the usual
step-size control; its NFE is whatever the tolerance needs.
"""

from __future__ import annotations

import torch

from edmlab.sampling.registry import Callback, Context, Denoise, Step, register


def _heun_scaled(D: Denoise, x: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Heun steps in sigma on the scaled ODE between positive levels (no final step to 0)."""
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:], strict=True):
        d = (x - D(x, sigma)) / sigma
        x_euler = x + (sigma_next - sigma) * d
        x = x + (sigma_next - sigma) * (d + (x_euler - D(x_euler, sigma_next)) / sigma_next) / 2
    return x


@register("restart")
def restart(D: Denoise, x: torch.Tensor, sigmas: torch.Tensor, callback: Callback, ctx: Context, *,
            restarts: int = 1, restart_sigma_min: float = 0.1, restart_sigma_max: float = 1.0,
            restart_steps: int = 4, s_noise: float = 1.0, rho: float = 7.0) -> torch.Tensor:
    """Restart sampling (Xu et al. 2023, Alg. 1): Heun on the steps; at the first level <= restart_sigma_min, `restarts`
    times: noise up to restart_sigma_max (forward process) and Heun back in `restart_steps` rho-spaced steps."""
    if restarts < 0 or restart_steps < 1 or not 0 < restart_sigma_min < restart_sigma_max:
        raise ValueError(f"restart needs restarts >= 0, restart_steps >= 1, 0 < restart_sigma_min < restart_sigma_max;"
                         f" got {restarts}, {restart_steps}, {restart_sigma_min}, {restart_sigma_max}")
    positive = sigmas[sigmas > 0]
    at = int((positive <= restart_sigma_min).nonzero()[0]) if (positive <= restart_sigma_min).any() else -1
    for i, (sigma, sigma_next) in enumerate(zip(sigmas[:-1], sigmas[1:], strict=True)):
        if i == at:
            ramp = torch.linspace(0, 1, restart_steps + 1, dtype=sigmas.dtype, device=sigmas.device)
            a, b = restart_sigma_max ** (1 / rho), sigma ** (1 / rho)
            inner = (a + ramp * (b - a)) ** rho
            inner[-1] = sigma
            for _ in range(restarts):
                x = x + (inner[0] ** 2 - sigma**2).sqrt() * s_noise * ctx.noise(x)
                x = _heun_scaled(D, x, inner)
        if sigma_next == 0:
            denoised = D(x, sigma)
            callback(Step(i, sigma, sigma_next, x, denoised))
            return denoised
        denoised = D(x, sigma)
        callback(Step(i, sigma, sigma_next, x, denoised))
        d = (x - denoised) / sigma
        x_euler = x + (sigma_next - sigma) * d
        x = x + (sigma_next - sigma) * (d + (x_euler - D(x_euler, sigma_next)) / sigma_next) / 2
    return x


# Butcher tableaux (c, A, b, b_low, lower order); both are FSAL: the last stage is the new state.
_TABLEAUX = {
    "bosh3": ((0, 1 / 2, 3 / 4, 1), ((), (1 / 2,), (0, 3 / 4), (2 / 9, 1 / 3, 4 / 9)),
              (2 / 9, 1 / 3, 4 / 9, 0), (7 / 24, 1 / 4, 1 / 3, 1 / 8), 2),
    "dopri5": ((0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1, 1),
               ((), (1 / 5,), (3 / 40, 9 / 40), (44 / 45, -56 / 15, 32 / 9),
                (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
                (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
                (35 / 384, 0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84)),
               (35 / 384, 0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0),
               (5179 / 57600, 0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40), 4),
}


@register("adaptive")
def adaptive(D: Denoise, x: torch.Tensor, sigmas: torch.Tensor, callback: Callback, ctx: Context, *,
             method: str = "dopri5", rtol: float = 1e-5, atol: float = 1e-5, max_nfe: int = 100_000) -> torch.Tensor:
    """Embedded Runge-Kutta in ln sigma from sigmas[0] to the last positive level, then D (Hairer et al. II.4)."""
    if method not in _TABLEAUX:
        raise ValueError(f"adaptive method must be one of {', '.join(_TABLEAUX)}, got {method!r}")
    c, A, b, b_low, q = _TABLEAUX[method]
    positive = sigmas[sigmas > 0]
    u, u_end = positive[0].log(), positive[-1].log()
    f = lambda u, x: x - D(x, u.exp())  # noqa: E731
    h = (u_end - u) / max(len(positive) - 1, 1)
    k0, nfe, i = f(u, x), 1, 0
    while (u_end - u).abs() > 1e-12:
        h = h.sign() * torch.minimum(h.abs(), (u_end - u).abs())
        ks = [k0]
        for s in range(1, len(c)):
            ks.append(f(u + c[s] * h, x + h * sum(a * k for a, k in zip(A[s], ks, strict=False) if a)))
        nfe += len(c) - 1
        x_new = x + h * sum(w * k for w, k in zip(b, ks, strict=True) if w)
        error = h * sum((w - v) * k for w, v, k in zip(b, b_low, ks, strict=True) if w != v)
        scale = atol + rtol * torch.maximum(x.abs(), x_new.abs())
        err = (error / scale).flatten(1).square().mean(1).sqrt().max().item()
        if err <= 1:
            callback(Step(i, u.exp(), (u + h).exp(), x, x - k0))
            u, x, k0, i = u + h, x_new, ks[-1], i + 1
        if nfe > max_nfe:
            raise RuntimeError(f"adaptive solve exceeded max_nfe={max_nfe}; loosen rtol/atol")
        h = h * min(5.0, max(0.2, 0.9 * (err + 1e-16) ** (-1 / (q + 1))))
    denoised = x - k0  # FSAL: D at the end point is already known
    callback(Step(i, u_end.exp(), sigmas[-1], x, denoised))
    return denoised

