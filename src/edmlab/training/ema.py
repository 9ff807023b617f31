"""Exponential moving averages of the weights: EDM's half-life EMA and EDM2's power-function EMA.

EDM (Karras et al. 2022, `training_loop.py`): the half-life is measured in
images and ramped up as a fixed fraction of the images seen so far, so the
average forgets the random initialisation quickly. EDM2 (Karras et al. 2024,
Sec. 3.1, `phema.py`): the power-function profile p(tau) ~ tau^gamma has no
fixed length; snapshots of two such averages let any other length be
reconstructed after training by least squares (`posthoc_coefficients`).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

__all__ = ["EMA", "PowerFunctionEMA", "sigma_rel_to_gamma", "gamma_to_sigma_rel", "power_function_beta",
           "posthoc_coefficients", "reconstruct_posthoc"]


def _frozen_copy(module: nn.Module) -> nn.Module:
    return copy.deepcopy(module).eval().requires_grad_(False)


@torch.no_grad()
def _lerp_into(ema: nn.Module, net: nn.Module, beta: float) -> None:
    """ema <- beta ema + (1 - beta) net for parameters, bit-identical to EDM's per-parameter
    `p_ema.copy_(p_net.lerp(p_ema, beta))`, in one foreach call; buffers copied."""
    ema_params = list(ema.parameters())
    net_params = list(net.parameters())  # read only, under no_grad: no detach or cast (their cost is per tensor)
    if any(p.dtype != q.dtype for p, q in zip(net_params, ema_params, strict=True)):
        net_params = [p.to(q.dtype) for p, q in zip(net_params, ema_params, strict=True)]
    dtypes = {p.dtype for p in ema_params}
    # the weight as lerp's kernels hold it: float64 for float64 tensors, float32 for float32 and lower
    beta_op = float(beta) if dtypes == {torch.float64} else float(np.float32(beta))
    if len(dtypes) == 1 and beta_op > 0.5:
        # lerp(net, ema, beta) rounds as ema + (beta - 1)(ema - net) for weights above 1/2, and so does
        # lerp(ema, net, w) with w = 1 - beta below 1/2 (1 - beta_op is exact): in place, no temporaries.
        torch._foreach_lerp_(ema_params, net_params, 1.0 - beta_op)
    else:  # the first steps of the ramp-up (beta = 0 copies the network)
        torch._foreach_copy_(ema_params, torch._foreach_lerp(net_params, ema_params, beta))
    ema_buffers, net_buffers = list(ema.buffers()), list(net.buffers())
    if ema_buffers:
        torch._foreach_copy_(ema_buffers, net_buffers)


class EMA(nn.Module):
    """EDM's EMA: beta = 0.5^(batch / h), h = min(halflife, rampup_ratio x images seen) (EDM App. F.1)."""

    def __init__(self, module: nn.Module,
                 halflife_kimg: float = 500.0,          # steady-state half-life, in thousands of images
                 rampup_ratio: float | None = 0.05,     # h <= ratio * images seen; None disables the ramp
                 ) -> None:
        super().__init__()
        if halflife_kimg <= 0:
            raise ValueError(f"ema halflife_kimg must be > 0, got {halflife_kimg}")
        self.module = _frozen_copy(module)
        self.halflife_kimg = float(halflife_kimg)
        self.rampup_ratio = None if rampup_ratio is None else float(rampup_ratio)

    def halflife_nimg(self, nimg: float) -> float:
        """The half-life in images after `nimg` images (before this step's batch, as in EDM)."""
        h = self.halflife_kimg * 1000
        return h if self.rampup_ratio is None else min(h, nimg * self.rampup_ratio)

    def beta(self, nimg: float, batch_size: int) -> float:
        """Decay per step; 0 at nimg = 0, so the first update copies the network."""
        return 0.5 ** (batch_size / max(self.halflife_nimg(nimg), 1e-8))

    def update(self, net: nn.Module, nimg: float, batch_size: int) -> float:
        beta = self.beta(nimg, batch_size)
        _lerp_into(self.module, net, beta)
        return beta

    def train(self, mode: bool = True) -> EMA:
        return super().train(False)  # the average never runs dropout


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent gamma whose profile has relative std sigma_rel (EDM2 eq. 3, solved as a cubic)."""
    if not 0 < sigma_rel < 12**-0.5:
        raise ValueError(f"sigma_rel must be in (0, {12 ** -0.5:.4f}) (gamma > 0), got {sigma_rel}")
    t = sigma_rel**-2
    return float(np.roots([1, 7, 16 - t, 12 - t]).real.max())


def gamma_to_sigma_rel(gamma: float) -> float:
    """sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3))) (EDM2 eq. 3)."""
    return float(np.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3))))


def power_function_beta(gamma: float, nimg: float, batch_size: int) -> float:
    """beta = (1 - batch / nimg)^(gamma + 1), nimg counted after the step (EDM2 eq. 2 in images)."""
    return (1 - batch_size / nimg) ** (gamma + 1)


class PowerFunctionEMA(nn.Module):
    """EDM2's power-function EMAs, one per sigma_rel (EDM2 Sec. 3.1); the first update copies the network."""

    def __init__(self, module: nn.Module, sigma_rels: Sequence[float] = (0.05, 0.10)) -> None:
        super().__init__()
        if not sigma_rels:
            raise ValueError("PowerFunctionEMA needs at least one sigma_rel, e.g. [0.05, 0.10]")
        self.sigma_rels = [float(s) for s in sigma_rels]
        self.gammas = [sigma_rel_to_gamma(s) for s in self.sigma_rels]
        self.emas = nn.ModuleList(_frozen_copy(module) for _ in self.sigma_rels)

    def update(self, net: nn.Module, nimg_after: float, batch_size: int) -> list[float]:
        betas = [power_function_beta(g, nimg_after, batch_size) for g in self.gammas]
        for ema, beta in zip(self.emas, betas, strict=True):
            _lerp_into(ema, net, beta)
        return betas

    def train(self, mode: bool = True) -> PowerFunctionEMA:
        return super().train(False)


def _profile_dot(t_a, gamma_a, t_b, gamma_b):
    """<p_a, p_b> of profiles p(tau) = (gamma+1) tau^gamma / t^(gamma+1) on [0, t] (EDM2 App. C.2)."""
    t_lo, t_hi = np.minimum(t_a, t_b), np.maximum(t_a, t_b)
    gamma_hi = np.where(t_a < t_b, gamma_b, gamma_a)  # exponent of the profile that ends later
    return (gamma_a + 1) * (gamma_b + 1) / (gamma_a + gamma_b + 1) * (t_lo / t_hi) ** gamma_hi / t_hi


def posthoc_coefficients(snapshot_nimg: Sequence[float], snapshot_sigma_rel: Sequence[float],
                         target_nimg: float, target_sigma_rel: float) -> np.ndarray:
    """Weights x with sum_i x_i p_i closest (L2) to the target profile (EDM2 App. C.3, least squares).

    As NVlabs/edm2 `solve_posthoc_coefficients`, x is rescaled to sum to 1 so the result is an average.
    """
    t = np.asarray(snapshot_nimg, dtype=np.float64)
    g = np.asarray([sigma_rel_to_gamma(s) for s in snapshot_sigma_rel], dtype=np.float64)
    if t.shape != g.shape or t.ndim != 1:
        raise ValueError("snapshot_nimg and snapshot_sigma_rel must be equal-length 1-D sequences")
    A = _profile_dot(t[:, None], g[:, None], t[None, :], g[None, :])
    b = _profile_dot(t, g, float(target_nimg), sigma_rel_to_gamma(target_sigma_rel))
    x = np.linalg.lstsq(A, b, rcond=None)[0]
    return x / x.sum()


def reconstruct_posthoc(snapshots: Sequence[Mapping], target_sigma_rel: float,
                        target_nimg: float | None = None) -> dict[str, torch.Tensor]:
    """A state dict for any sigma_rel from snapshots {"nimg", "sigma_rel", "state_dict"} (EDM2 Sec. 3.2)."""
    if not snapshots:
        raise ValueError("reconstruct_posthoc needs at least one snapshot")
    target_nimg = max(s["nimg"] for s in snapshots) if target_nimg is None else target_nimg
    x = posthoc_coefficients([s["nimg"] for s in snapshots], [s["sigma_rel"] for s in snapshots], target_nimg,
                             target_sigma_rel)
    out: dict[str, torch.Tensor] = {}
    for key, ref in snapshots[0]["state_dict"].items():
        if not ref.is_floating_point():
            out[key] = ref.clone()
            continue
        acc = sum(float(w) * s["state_dict"][key].double() for w, s in zip(x, snapshots, strict=True))
        out[key] = acc.to(ref.dtype)
    return out
