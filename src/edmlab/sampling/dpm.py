"""DPM-Solver++ multistep solvers in lambda = -ln sigma on the scaled ODE, and their SDE variants (Lu et al. 2022).

In the scaled state the exact solution from sigma to sigma' = sigma e^{-h} is

    x' = e^{-h} x + int_0^h e^{-(h-u)} D(u) du,

and the multistep solvers replace D(u) by its Taylor polynomial fitted to the last
one, two or three denoiser outputs. The SDE variants follow the reverse SDE with
eta = 1 (eta in [0, 1] interpolates; eta = 0 is the ODE solver). Every step into
sigma = 0 is D itself. The formulas are those of k-diffusion's
`sample_dpmpp_2m`, `sample_dpmpp_2m_sde` (midpoint) and `sample_dpmpp_3m_sde`, except that
k-diffusion weighs the second difference of the 3M update by half its Taylor weight, which
leaves it second order (measured); `kdiffusion=True` reproduces that.
"""

from __future__ import annotations

import torch

from edmlab.sampling.registry import Callback, Context, Denoise, Step, register


def _dpmpp(D: Denoise, x: torch.Tensor, sigmas: torch.Tensor, callback: Callback, ctx: Context, *, order: int,
           eta: float, s_noise: float, kdiffusion: bool = False, lower_order_final: bool = False) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2) / (3M) with SDE noise eta (their Sec. 5, eta = 1)."""
    history: list[tuple[torch.Tensor, torch.Tensor]] = []  # (D, h) of the previous steps, newest first
    steps = len(sigmas) - 1
    for i, (sigma, sigma_next) in enumerate(zip(sigmas[:-1], sigmas[1:], strict=True)):
        denoised = D(x, sigma)
        callback(Step(i, sigma, sigma_next, x, denoised))
        if sigma_next == 0:
            return denoised
        h = (sigma / sigma_next).log()
        if h == 0:  # a repeated level (e.g. snapped by round_sigma) is no step
            continue
        h_eta = h * (1 + eta)
        phi_1 = -torch.expm1(-h_eta)  # 1 - e^{-h_eta}
        x = sigma_next / sigma * (-eta * h).exp() * x + phi_1 * denoised
        # lower_order_final: order <= the steps left, so the step into sigma_min is second order (diffusers).
        # Off by default: at 5-15 NFE on the analytic mixtures it helps on EDM's steps and hurts on log-SNR ones.
        used = history[: steps - 1 - i] if lower_order_final else history
        if used and order == 2:  # midpoint: D at half a step (Algorithm 2)
            d_1, h_1 = history[0]
            x = x + 0.5 * phi_1 * (h / h_1) * (denoised - d_1)
        elif used:
            phi_2 = 1 - phi_1 / h_eta  # (h_eta - 1 + e^{-h_eta}) / h_eta: the weight of h D'
            d_1, h_1 = history[0]
            d1_0 = (denoised - d_1) * h / h_1  # h D'(lambda), from the last two outputs
            if len(used) == 1:
                x = x + phi_2 * d1_0
            else:
                d_2, h_2 = history[1]
                r0, r1 = h_1 / h, h_2 / h
                d1_1 = (d_1 - d_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_3 = phi_2 / h_eta - 0.5
                # d2 = h^2 D''/2, whose weight in the exact integral is -2 phi_3 (k-diffusion: -phi_3, order 2)
                x = x + phi_2 * d1 - (1 if kdiffusion else 2) * phi_3 * d2
        if eta:
            x = x + sigma_next * (-torch.expm1(-2 * eta * h)).sqrt() * s_noise * ctx.noise(x)
        history = [(denoised, h)] + history[: order - 2]
    return x


@register("dpmpp_2m")
def dpmpp_2m(D: Denoise, x: torch.Tensor, sigmas: torch.Tensor, callback: Callback, ctx: Context) -> torch.Tensor:
    """DPM-Solver++(2M) in lambda = -ln sigma (Lu et al. 2022, Algorithm 2); first-order at both ends."""
    return _dpmpp(D, x, sigmas, callback, ctx, order=2, eta=0.0, s_noise=1.0)


@register("dpmpp_3m")
def dpmpp_3m(D: Denoise, x: torch.Tensor, sigmas: torch.Tensor, callback: Callback, ctx: Context, *,
             kdiffusion: bool = False, lower_order_final: bool = False) -> torch.Tensor:
    """DPM-Solver++(3M): the third-order multistep update (Lu et al. 2022, App. B); lower orders to start and,
    with lower_order_final (diffusers' option), to end."""
    return _dpmpp(D, x, sigmas, callback, ctx, order=3, eta=0.0, s_noise=1.0, kdiffusion=kdiffusion,
                  lower_order_final=lower_order_final)


@register("dpmpp_2m_sde")
def dpmpp_2m_sde(D: Denoise, x: torch.Tensor, sigmas: torch.Tensor, callback: Callback, ctx: Context, *,
                 eta: float = 1.0, s_noise: float = 1.0) -> torch.Tensor:
    """SDE-DPM-Solver++(2M) (Lu et al. 2022, Sec. 5): the reverse SDE's exact linear part, fresh noise per step."""
    return _dpmpp(D, x, sigmas, callback, ctx, order=2, eta=eta, s_noise=s_noise)


@register("dpmpp_3m_sde")
def dpmpp_3m_sde(D: Denoise, x: torch.Tensor, sigmas: torch.Tensor, callback: Callback, ctx: Context, *,
                 eta: float = 1.0, s_noise: float = 1.0, kdiffusion: bool = False,
                 lower_order_final: bool = False) -> torch.Tensor:
    """SDE-DPM-Solver++(3M): the third-order multistep update on the reverse SDE (eta = 0: dpmpp_3m)."""
    return _dpmpp(D, x, sigmas, callback, ctx, order=3, eta=eta, s_noise=s_noise, kdiffusion=kdiffusion,
                  lower_order_final=lower_order_final)
