"""Magnitude-preserving layers of EDM2 (Karras et al. 2024, "Analyzing and Improving the Training Dynamics
of Diffusion Models", Sec. 2 and App. B): every operation keeps unit-variance inputs at unit variance.

Names and equation numbers follow NVlabs/edm2 `training/networks_edm2.py` (equations of the arXiv version).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["normalize", "resample", "mp_silu", "mp_sum", "mp_cat", "MPFourier", "MPConv"]

SILU_STD = 0.596  # E[silu(x)^2]^(1/2) for x ~ N(0, 1)


def normalize(x: torch.Tensor, dim: Sequence[int] | int | None = None, eps: float = 1e-4) -> torch.Tensor:
    """x / (eps + ||x|| / sqrt(n)) over `dim` (all but the first by default): unit RMS per slice (eq. 66)."""
    if dim is None:
        dim = list(range(1, x.ndim))
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=torch.promote_types(x.dtype, torch.float32))
    norm = torch.add(eps, norm, alpha=math.sqrt(norm.numel() / x.numel()))
    return x / norm.to(x.dtype)


def resample(x: torch.Tensor, f: Sequence[float] = (1, 1), mode: str = "keep") -> torch.Tensor:
    """2x down- or upsampling with the separable filter f (box filter [1, 1] by default), or identity."""
    if mode == "keep":
        return x
    f = torch.as_tensor(f, dtype=x.dtype, device=x.device)
    pad = (len(f) - 1) // 2
    f = torch.outer(f, f) / f.sum() ** 2
    c = x.shape[1]
    if mode == "down":
        return F.conv2d(x, f.tile([c, 1, 1, 1]), groups=c, stride=2, padding=(pad,))
    if mode != "up":
        raise ValueError(f"resample mode must be keep, down or up, got {mode!r}")
    return F.conv_transpose2d(x, (f * 4).tile([c, 1, 1, 1]), groups=c, stride=2, padding=(pad,))


def mp_silu(x: torch.Tensor) -> torch.Tensor:
    """SiLU scaled to unit output magnitude for unit-variance input (eq. 81)."""
    return F.silu(x) / SILU_STD


def mp_sum(a: torch.Tensor, b: torch.Tensor, t: float = 0.5) -> torch.Tensor:
    """((1 - t) a + t b) / sqrt((1 - t)^2 + t^2): a balanced sum of unit-variance terms (eq. 88)."""
    return a.lerp(b, t) / math.sqrt((1 - t) ** 2 + t ** 2)


def mp_cat(a: torch.Tensor, b: torch.Tensor, dim: int = 1, t: float = 0.5) -> torch.Tensor:
    """Concatenation weighted (1 - t) : t with the result at unit magnitude (eq. 103)."""
    Na, Nb = a.shape[dim], b.shape[dim]
    C = math.sqrt((Na + Nb) / ((1 - t) ** 2 + t ** 2))
    wa = C / math.sqrt(Na) * (1 - t)
    wb = C / math.sqrt(Nb) * t
    return torch.cat([wa * a, wb * b], dim=dim)


class MPFourier(nn.Module):
    """sqrt(2) cos(2 pi (f x + phi)) with random f ~ N(0, bandwidth^2), phi ~ U(0, 1): unit variance (eq. 75)."""

    def __init__(self,
                 num_channels: int,      # number of features
                 bandwidth: float = 1,   # std of the frequencies
                 ) -> None:
        super().__init__()
        # Scaled in place: no Python meta kernel (and no torch._dynamo import) in the loader's meta-device probe.
        self.register_buffer("freqs", torch.randn(num_channels).mul_(2 * math.pi).mul_(bandwidth))
        self.register_buffer("phases", torch.rand(num_channels).mul_(2 * math.pi))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.to(torch.float32).ger(self.freqs.to(torch.float32)) + self.phases.to(torch.float32)
        return (y.cos() * math.sqrt(2)).to(x.dtype)


class MPConv(nn.Module):
    """Bias-free convolution (kernel [k, k]) or linear layer (kernel []) with unit-norm weights (eq. 47, 66).

    In training the stored weight is *force-normalised* in place (each output unit back to unit RMS, eq. 66),
    and the forward pass normalises again and scales by gain / sqrt(fan_in), so unit-variance inputs give
    unit-variance outputs whatever the optimiser does to the weight's norm.
    """

    def __init__(self,
                 in_channels: int,       # input channels (features)
                 out_channels: int,      # output channels (features)
                 kernel: Sequence[int],  # [] = linear layer, [k, k] = k x k convolution
                 ) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, *kernel))

    def forward(self, x: torch.Tensor, gain: float | torch.Tensor = 1) -> torch.Tensor:
        w = self.weight.to(torch.float32)
        if self.training:
            with torch.no_grad():
                self.weight.copy_(normalize(w))  # forced weight normalisation
        w = normalize(w)  # differentiable normalisation: the gradient is orthogonal to w
        w = (w * (gain / math.sqrt(w[0].numel()))).to(x.dtype)
        if w.ndim == 2:
            return x @ w.t()
        return F.conv2d(x, w, padding=(w.shape[-1] // 2,))
