"""iPNDM: Adams-Bashforth multistep on d x_hat / d sigma = eps(x_hat; sigma) = (x_hat - D) / sigma.

Zhang & Chen 2023 (DEIS, "improved PNDM"): the fixed Adams-Bashforth weights of
orders 1-4 with lower orders to start, one NFE per step. `variable_step=True`
integrates the Lagrange interpolant of the past eps over each actual step
instead (the weights of non-uniform steps), which keeps order 4 on any steps.
Every step into sigma = 0 is D itself.
"""

from __future__ import annotations

import torch

from edmlab.sampling.registry import Callback, Context, Denoise, Step, register

# Adams-Bashforth weights for eps_n, eps_{n-1}, ... at equal steps.
_AB = {1: (1.0,), 2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}
_GAUSS = torch.tensor([-0.7745966692414834, 0.0, 0.7745966692414834], dtype=torch.float64)  # 3-point Gauss nodes
_GAUSS_W = torch.tensor([5 / 9, 8 / 9, 5 / 9], dtype=torch.float64)


def _lagrange_weights(nodes: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """w_j = int_a^b L_j(s) ds / (b - a) for the Lagrange basis on `nodes` (exact: degree <= 3, 3-point Gauss)."""
    s = (a + b) / 2 + (b - a) / 2 * _GAUSS.to(nodes.device)
    w = []
    for j in range(len(nodes)):
        L = torch.ones_like(s)
        for k in range(len(nodes)):
            if k != j:
                L = L * (s - nodes[k]) / (nodes[j] - nodes[k])
        w.append((L * _GAUSS_W.to(nodes.device)).sum() / 2)
    return torch.stack(w)


@register("ipndm")
def ipndm(D: Denoise, x: torch.Tensor, sigmas: torch.Tensor, callback: Callback, ctx: Context, *,
          max_order: int = 4, variable_step: bool = False) -> torch.Tensor:
    """iPNDM (Zhang & Chen 2023, Alg. 2 with eps = (x - D)/sigma): Adams-Bashforth of order <= max_order."""
    if max_order not in _AB:
        raise ValueError(f"ipndm max_order must be 1, 2, 3 or 4, got {max_order}")
    eps_history: list[torch.Tensor] = []
    for i, (sigma, sigma_next) in enumerate(zip(sigmas[:-1], sigmas[1:], strict=True)):
        denoised = D(x, sigma)
        callback(Step(i, sigma, sigma_next, x, denoised))
        if sigma_next == 0:
            return denoised
        eps_history = [(x - denoised) / sigma] + eps_history[: max_order - 1]
        order = len(eps_history)
        if variable_step:
            weights = _lagrange_weights(sigmas[max(i - order + 1, 0): i + 1].flip(0), sigma, sigma_next)
        else:
            weights = _AB[order]
        x = x + (sigma_next - sigma) * sum(w * e for w, e in zip(weights, eps_history, strict=True))
    return x
