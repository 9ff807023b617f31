"""UniPC: the unified predictor-corrector of Zhao et al. 2023, data prediction, in lambda = -ln sigma.

UniP-p extrapolates D from the last p outputs (their Algorithm 2 with the B(h)
variants bh1: B(h) = h, bh2: B(h) = e^h - 1); UniC re-solves the step just taken
with the output D(x_{i+1}) the next step evaluates anyway, raising the order by
one at no extra NFE (their Algorithm 3). The coefficients are diffusers'
`multistep_uni_p_bh_update` / `multistep_uni_c_bh_update` (order 2: rho = 1/2).
Every step into sigma = 0 is D itself.
"""

from __future__ import annotations

import torch

from edmlab.sampling.registry import Callback, Context, Denoise, Step, register


def _coefficients(rks: torch.Tensor, h: torch.Tensor, variant: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """R (rows r_k^{i-1}), b_i = phi_{i+1}(h) i! / B(h) and B(h) of the UniPC linear system (their eq. 8)."""
    hh = -h
    h_phi_k = torch.expm1(hh) / hh - 1
    B_h = hh if variant == "bh1" else torch.expm1(hh)
    R, b, factorial = [], [], 1
    for i in range(1, len(rks) + 1):
        R.append(rks ** (i - 1))
        b.append(h_phi_k * factorial / B_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    return torch.stack(R), torch.stack(b), B_h


def _update(x: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor, history: list, order: int,
            variant: str, corrector_output: torch.Tensor | None = None) -> torch.Tensor:
    """One UniP step from (sigma, x) with history [(lambda, D), ...] newest first; with D at the end: UniC."""
    lam, m0 = history[0]
    h = (sigma / sigma_next).log()
    rks, D1s = [], []
    for lam_k, m_k in history[1:order]:
        rk = (lam_k - lam) / h
        rks.append(rk)
        D1s.append((m_k - m0) / rk)
    R, b, B_h = _coefficients(torch.stack(rks + [torch.ones_like(h)]), h, variant)
    x_base = sigma_next / sigma * x + (-torch.expm1(-h)) * m0
    if corrector_output is None:
        if not D1s:
            return x_base
        rhos = torch.tensor([0.5], dtype=h.dtype) if order == 2 else torch.linalg.solve(R[:-1, :-1], b[:-1])
        return x_base - B_h * sum(r * d for r, d in zip(rhos, D1s, strict=True))
    rhos = torch.tensor([0.5], dtype=h.dtype) if order == 1 else torch.linalg.solve(R, b)
    res = sum((r * d for r, d in zip(rhos[:-1], D1s, strict=True)), torch.zeros_like(x))
    return x_base - B_h * (res + rhos[-1] * (corrector_output - m0))


@register("unipc")
def unipc(D: Denoise, x: torch.Tensor, sigmas: torch.Tensor, callback: Callback, ctx: Context, *, order: int = 3,
          variant: str = "bh2", corrector: bool = True, lower_order_final: bool = True) -> torch.Tensor:
    """UniPC-p (Zhao et al. 2023): UniP of order p (warm-up from 1), UniC after every step but the last.

    lower_order_final (diffusers' default): order <= the steps left, so the last step before D is of
    order <= 2: far more stable when the steps end with a long jump to sigma_min.
    """
    if order not in (1, 2, 3):
        raise ValueError(f"unipc order must be 1, 2 or 3, got {order}")
    if variant not in ("bh1", "bh2"):
        raise ValueError(f"unipc variant must be bh1 or bh2, got {variant!r}")
    history: list[tuple[torch.Tensor, torch.Tensor]] = []
    last: tuple[torch.Tensor, torch.Tensor, int] | None = None  # (x, sigma, order) the last predictor started from
    for i, (sigma, sigma_next) in enumerate(zip(sigmas[:-1], sigmas[1:], strict=True)):
        if sigma_next > 0 and sigma_next == sigma:
            raise ValueError(f"unipc needs distinct levels; sigma {sigma.item():g} repeats (round_sigma?)")
        denoised = D(x, sigma)
        if corrector and last is not None:
            x_prev, sigma_prev, p = last
            x = _update(x_prev, sigma_prev, sigma, history, p, variant, corrector_output=denoised)
        callback(Step(i, sigma, sigma_next, x, denoised))
        if sigma_next == 0:
            return denoised
        history = [(-sigma.log(), denoised)] + history[: order - 1]
        p = min(order, len(history), len(sigmas) - 1 - i if lower_order_final else order)
        last = (x, sigma, p)
        x = _update(x, sigma, sigma_next, history, p, variant)
    return x

