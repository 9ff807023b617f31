"""Guidance: D_w(x; sigma) = G(x; sigma) + w (D(x; sigma) - G(x; sigma)) as a drop-in denoiser.

G is the same network without class labels (classifier-free guidance, Ho & Salimans 2022, eq. 6 written
for the denoiser) or a second, weaker denoiser with the same conditioning (autoguidance, Karras et al.
2024, eq. 2). With `interval=(sigma_lo, sigma_hi)` the weight is w for sigma_lo < sigma <= sigma_hi and 1
elsewhere (Kynkäänniemi et al. 2024). Every sampler takes a `GuidedDenoiser` where it takes a denoiser.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from edmlab.precond import DenoiserLike, check_denoiser

__all__ = ["GuidedDenoiser", "guided"]


class GuidedDenoiser(nn.Module):
    """D_w = G + w (D - G), called like the denoiser it wraps: (x, sigma, class_labels=None, **kwargs).

    Counting: `nfe` is the number of network forward passes. A classifier-free step runs the
    conditional and unconditional branches as ONE forward of a doubled batch and counts 1 (`items`
    counts the 2N rows); an autoguidance step runs D and the guide and counts 2; an unguided call
    (w = 1, or sigma outside the interval) runs D alone and counts 1. `reset()` zeroes both counters.
    """

    def __init__(self,
                 denoiser: DenoiserLike,                             # D: the conditional (or main) denoiser
                 guidance: float = 1.0,                              # w; 1 = D exactly, 0 = G
                 guide: DenoiserLike | None = None,                  # None: classifier-free; else autoguidance
                 interval: Sequence[float] | None = None,            # (sigma_lo, sigma_hi): w inside, 1 outside
                 batched: bool = True,                               # CFG: one forward of 2N rows (else two)
                 ) -> None:
        super().__init__()
        check_denoiser(denoiser, "guidance: the denoiser")
        if guide is not None:
            check_denoiser(guide, "guidance: the guide")
        if not math.isfinite(float(guidance)):
            raise ValueError(f"guidance must be a finite number, got {guidance!r}")
        if interval is not None:
            interval = tuple(float(v) for v in interval)
            if len(interval) != 2 or not 0 <= interval[0] < interval[1]:
                raise ValueError(f"guidance_interval must be [sigma_lo, sigma_hi] with 0 <= sigma_lo < sigma_hi, "
                                 f"got {list(interval)}")
        self.denoiser = denoiser
        self.guide = guide
        self.guidance = float(guidance)
        self.interval = interval
        self.batched = bool(batched)
        self.nfe = 0
        self.items = 0

    def __getattr__(self, name: str):
        """Everything else (precond, net, ...) is the wrapped denoiser's."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("denoiser", "guide") or name.startswith("_"):
                raise
            return getattr(self.denoiser, name)

    @property
    def sigma_min(self) -> float:
        """The range where D and the guide are both defined."""
        return max(float(m.sigma_min) for m in self._models())

    @property
    def sigma_max(self) -> float:
        return min(float(m.sigma_max) for m in self._models())

    @property
    def label_dim(self) -> int:
        return self.denoiser.label_dim

    @property
    def data_shape(self) -> tuple[int, ...] | None:
        return self.denoiser.data_shape

    def round_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        """D's rounding: the guide is evaluated at the levels D visits."""
        return self.denoiser.round_sigma(sigma)

    def _models(self) -> list[DenoiserLike]:
        return [self.denoiser] if self.guide is None else [self.denoiser, self.guide]

    def reset(self) -> None:
        self.nfe = self.items = 0

    def weight_active(self, sigma) -> torch.Tensor | bool:
        """Where w applies: True/False for a shared sigma, a [N] mask for one sigma per item."""
        if self.guidance == 1:
            return False
        if self.interval is None:
            return True
        sigma = torch.as_tensor(sigma).reshape(-1)
        inside = (sigma > self.interval[0]) & (sigma <= self.interval[1])
        return bool(inside.item()) if sigma.numel() == 1 else inside

    def _call(self, model: DenoiserLike, x: torch.Tensor, sigma, class_labels, **kwargs) -> torch.Tensor:
        self.nfe += 1
        self.items += x.shape[0]
        return model(x, sigma, class_labels=class_labels, **kwargs)

    def _unconditional_pair(self, x, sigma, class_labels, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """(D(x | c), D(x | no class)): zero label rows mean "no class" (the label-dropout convention)."""
        if class_labels is None:
            raise ValueError("classifier-free guidance needs class labels (the network is called with and "
                             "without them); pass class_labels, or a guide= denoiser for autoguidance")
        labels = class_labels
        if not labels.is_floating_point():
            labels = nn.functional.one_hot(labels.long(), int(self.denoiser.label_dim)).to(x.dtype)
        empty = torch.zeros_like(labels)
        if not self.batched:
            return self._call(self.denoiser, x, sigma, labels, **kwargs), \
                self._call(self.denoiser, x, sigma, empty, **kwargs)
        sigma = torch.as_tensor(sigma, device=x.device)
        sigma2 = torch.cat([sigma, sigma]) if sigma.ndim and sigma.shape[0] == x.shape[0] > 1 else sigma
        kwargs2 = {k: torch.cat([v, v]) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        both = self._call(self.denoiser, torch.cat([x, x]), sigma2, torch.cat([labels, empty]), **kwargs2)
        return both[: x.shape[0]], both[x.shape[0]:]

    def forward(self, x: torch.Tensor, sigma, class_labels: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        active = self.weight_active(sigma)
        if active is False or (isinstance(active, torch.Tensor) and not active.any()):
            return self._call(self.denoiser, x, sigma, class_labels, **kwargs)  # w = 1: D itself, no arithmetic
        if self.guide is None:
            D, G = self._unconditional_pair(x, sigma, class_labels, **kwargs)
        else:
            D = self._call(self.denoiser, x, sigma, class_labels, **kwargs)
            G = self._call(self.guide, x, sigma, class_labels, **kwargs).to(D.dtype)
        D_w = G + self.guidance * (D - G)
        if isinstance(active, torch.Tensor):  # one sigma per item, partly outside the interval
            D_w = torch.where(active.to(x.device).reshape(-1, *([1] * (x.ndim - 1))), D_w, D)
        return D_w


def guided(denoiser: DenoiserLike, guidance: float = 1.0, guide: DenoiserLike | None = None,
           interval: Sequence[float] | None = None, **kwargs) -> DenoiserLike:
    """The denoiser itself at guidance=1 (D_1 = D: the unguided sampler, bit for bit), else a `GuidedDenoiser`."""
    if float(guidance) == 1:
        return denoiser
    return GuidedDenoiser(denoiser, guidance, guide, interval, **kwargs)
