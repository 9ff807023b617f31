"""Preconditioning: D(x; sigma) = c_skip x + c_out F(c_in x; c_noise) (EDM eq. 7, Table 1).

Each class is one row of Table 1 (plus a flow-matching row, rectified flow's velocity target);
`Denoiser` wraps any network F with any row. `DenoiserLike` is what every denoiser offers the samplers,
guidance and generation: `Denoiser`, `edmlab.guidance.GuidedDenoiser` and the ideal ones of `edmlab.analytic`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from edmlab.process import VP

__all__ = ["Precond", "EDMPrecond", "VPPrecond", "VEPrecond", "IDDPMPrecond", "FMPrecond", "Denoiser",
           "DenoiserLike", "check_denoiser", "coefficients", "get", "iddpm_u", "NAMES"]

Coefficients = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


@runtime_checkable
class DenoiserLike(Protocol):
    """D(x; sigma), the estimate of clean y from x = y + n with n ~ N(0, sigma^2 I) (EDM eq. 2), and its range."""

    label_dim: int                        # classes of the one-hot `class_labels`; 0: unconditional
    sigma_min: float                      # D is defined for sigma_min <= sigma <= sigma_max
    sigma_max: float
    data_shape: tuple[int, ...] | None    # one sample: [C, H, W] or [d]; None when D does not know it

    def __call__(self, x: torch.Tensor, sigma: Any, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """D(x; sigma) for a batch x, sigma a scalar or one per item."""

    def round_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        """The noise level D can represent nearest to sigma (identity but for iDDPM's table)."""


def check_denoiser(denoiser: object, what: str = "denoiser") -> None:
    """Raise TypeError naming what `denoiser` lacks of `DenoiserLike`."""
    if isinstance(denoiser, DenoiserLike):
        return
    missing = [m for m in (*DenoiserLike.__annotations__, "round_sigma", "__call__") if not hasattr(denoiser, m)]
    raise TypeError(f"{what}: a {type(denoiser).__name__} is not a denoiser; it lacks {', '.join(missing)}. "
                    "Pass an edmlab.precond.Denoiser, an edmlab.analytic law, or an object with label_dim, "
                    "sigma_min, sigma_max, data_shape, round_sigma(sigma) and __call__(x, sigma, class_labels=None)")


class Precond:
    """A row of Table 1. `sigma_data` is the data std (used by the EDM row)."""

    name = "none"
    sigma_min, sigma_max = 0.0, math.inf

    def __init__(self, sigma_data: float = 0.5) -> None:
        self.sigma_data = float(sigma_data)

    def coefficients(self, sigma: torch.Tensor) -> Coefficients:
        raise NotImplementedError

    def round_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        """The sigma the network can represent (identity except for iDDPM's discrete table)."""
        return sigma


class EDMPrecond(Precond):
    """Table 1, "Ours": unit-variance input and training target for every sigma."""

    name = "edm"

    def coefficients(self, sigma):
        sd = self.sigma_data
        c_skip = sd**2 / (sigma**2 + sd**2)
        c_out = sigma * sd / (sigma**2 + sd**2).sqrt()
        c_in = 1 / (sd**2 + sigma**2).sqrt()
        c_noise = sigma.log() / 4
        return c_skip, c_out, c_in, c_noise


class VPPrecond(Precond):
    """Table 1, VP: F predicts eps; c_noise = (M-1) t(sigma)."""

    name = "vp"

    def __init__(self, sigma_data: float = 0.5, beta_d: float = 19.9, beta_min: float = 0.1, M: int = 1000,
                 epsilon_t: float = 1e-5):
        super().__init__(sigma_data)
        self.M = M
        self.process = VP(beta_d, beta_min)
        self.sigma_min, self.sigma_max = self.process.sigma(epsilon_t), self.process.sigma(1.0)

    def coefficients(self, sigma):
        c_skip = torch.ones_like(sigma)
        c_out = -sigma
        c_in = 1 / (sigma**2 + 1).sqrt()
        return c_skip, c_out, c_in, self.c_noise(sigma)

    def c_noise(self, sigma):
        """(M-1) t(sigma): exact in float64; below, NVlabs' formula with log(1 + sigma^2) in sigma's dtype, the
        values their VP networks were trained on (NCSN++'s Fourier embedding amplifies a one-ulp difference)."""
        beta_d, beta_min = self.process.beta_d, self.process.beta_min
        log = (sigma**2).log1p() if sigma.dtype == torch.float64 else (1 + sigma**2).log()
        return (self.M - 1) * (((beta_min**2 + 2 * beta_d * log).sqrt() - beta_min) / beta_d)


class VEPrecond(Precond):
    """Table 1, VE: F predicts the scaled noise; c_noise = ln(sigma/2)."""

    name = "ve"

    def __init__(self, sigma_data: float = 0.5, sigma_min: float = 0.02, sigma_max: float = 100.0):
        super().__init__(sigma_data)
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)

    def coefficients(self, sigma):
        c_skip = torch.ones_like(sigma)
        c_out = sigma
        c_in = torch.ones_like(sigma)
        c_noise = (0.5 * sigma).log()
        return c_skip, c_out, c_in, c_noise


def iddpm_u(M: int = 1000, C_1: float = 0.001, C_2: float = 0.008, dtype=torch.float64) -> torch.Tensor:
    """iDDPM's sigma table u_0 > ... > u_M = 0 (EDM Appendix C.3.4, cosine alpha_bar)."""

    def alpha_bar(j: int) -> torch.Tensor:
        return torch.tensor(0.5 * math.pi * j / M / (C_2 + 1), dtype=dtype).sin() ** 2

    u = torch.zeros(M + 1, dtype=dtype)
    for j in range(M, 0, -1):
        u[j - 1] = ((u[j] ** 2 + 1) / (alpha_bar(j - 1) / alpha_bar(j)).clip(min=C_1) - 1).sqrt()
    return u


class IDDPMPrecond(Precond):
    """Table 1, iDDPM: F predicts eps; c_noise is the index of the nearest table entry u_j."""

    name = "iddpm"

    def __init__(self, sigma_data: float = 0.5, C_1: float = 0.001, C_2: float = 0.008, M: int = 1000):
        super().__init__(sigma_data)
        self.M = M
        self.u = iddpm_u(M, C_1, C_2)
        self.sigma_min, self.sigma_max = float(self.u[M - 1]), float(self.u[0])

    def index(self, sigma: torch.Tensor) -> torch.Tensor:
        """argmin_j |u_j - sigma|."""
        u = self.u.to(sigma.device)
        return (sigma.to(torch.float64).unsqueeze(-1) - u).abs().argmin(-1)

    def round_sigma(self, sigma):
        return self.u.to(sigma.device)[self.index(sigma)].to(sigma.dtype)

    def coefficients(self, sigma):
        c_skip = torch.ones_like(sigma)
        c_out = -sigma
        c_in = 1 / (sigma**2 + 1).sqrt()
        c_noise = (self.M - 1 - self.index(sigma)).to(sigma.dtype)
        return c_skip, c_out, c_in, c_noise


class FMPrecond(Precond):
    """Flow matching (Lipman et al. 2023): F(x_t, t) predicts the velocity eps - x_0, with t = sigma/(1+sigma)."""

    name = "fm"

    def coefficients(self, sigma):
        c_skip = 1 / (1 + sigma)
        c_out = -sigma / (1 + sigma)
        c_in = 1 / (1 + sigma)
        c_noise = sigma / (1 + sigma)
        return c_skip, c_out, c_in, c_noise


_ROWS: dict[str, type[Precond]] = {c.name: c for c in (VPPrecond, VEPrecond, IDDPMPrecond, EDMPrecond, FMPrecond)}
NAMES = tuple(_ROWS)


def get(name: str, **params) -> Precond:
    """A row of Table 1 by name: "vp", "ve", "iddpm", "edm", "fm"."""
    if name not in _ROWS:
        raise ValueError(f"unknown preconditioning {name!r}; valid names: {', '.join(NAMES)}")
    return _ROWS[name](**params)


def coefficients(name: str, sigma, **params) -> Coefficients:
    """(c_skip, c_out, c_in, c_noise) of Table 1 at sigma (float or tensor; floats computed in float64)."""
    sigma = torch.as_tensor(sigma, dtype=None if isinstance(sigma, torch.Tensor) else torch.float64)
    return get(name, **params).coefficients(sigma)


class Denoiser(nn.Module):
    """D(x; sigma) = c_skip x + c_out F(c_in x; c_noise) (EDM eq. 7) around a network F.

    `sigma` is a scalar or one value per batch item. The network runs in its own
    parameter dtype; D is returned in the dtype of x (samplers keep float64 states).
    Extra output channels of F (iDDPM's learned variance) are dropped.
    With `logvar_channels` > 0 it also learns EDM2's log-variance u(sigma) = W Fourier(c_noise)
    (EDM2 eq. 21; names as NVlabs/edm2 `Precond`), returned by `forward(..., return_logvar=True)`.
    `name` picks the Table 1 row (`self.precond`, named `self.precond.name`); F states its `label_dim`;
    `data_shape` defaults to the shape F's build config implies (`edmlab.networks.data_shape`).
    """

    def __init__(self, net: nn.Module, name: str = "edm", sigma_data: float = 0.5, logvar_channels: int = 0,
                 data_shape: Sequence[int] | None = None, **params) -> None:
        super().__init__()
        if not hasattr(net, "label_dim"):
            raise TypeError(f"{type(net).__name__} has no label_dim: a network F must state how many classes it "
                            "takes (0: unconditional); build it with edmlab.networks.build or set net.label_dim")
        self.net = net
        self.precond = get(name, sigma_data=sigma_data, **params)
        self.precond_params = dict(sigma_data=sigma_data, **params)
        if logvar_channels:
            from edmlab.networks.mp_layers import MPConv, MPFourier

            self.logvar_fourier = MPFourier(int(logvar_channels))
            self.logvar_linear = MPConv(int(logvar_channels), 1, kernel=[])
            self.precond_params["logvar_channels"] = int(logvar_channels)
        self.sigma_data = float(sigma_data)
        self.sigma_min, self.sigma_max = self.precond.sigma_min, self.precond.sigma_max
        self.label_dim = int(net.label_dim)
        if data_shape is None and self.network_config is not None:
            from edmlab.networks import data_shape as implied_shape

            data_shape = implied_shape(self.network_config)
        self.data_shape = None if data_shape is None else tuple(int(s) for s in data_shape)

    @property
    def network_config(self) -> dict[str, Any] | None:
        """The `edmlab.networks.build` kwargs that rebuild F; None when F was built otherwise (F may be any module)."""
        return getattr(self.net, "build_config", None)

    def round_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        """The noise level the precond row can represent nearest to sigma."""
        return self.precond.round_sigma(torch.as_tensor(sigma))

    def forward(self, x: torch.Tensor, sigma, class_labels: torch.Tensor | None = None,
                augment_labels: torch.Tensor | None = None, return_logvar: bool = False):
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
        sigma = sigma.reshape(-1, *([1] * (x.ndim - 1))).expand(x.shape[0], *([1] * (x.ndim - 1)))
        c_skip, c_out, c_in, c_noise = self.precond.coefficients(sigma)
        dtype = next(self.net.parameters(), x).dtype
        if isinstance(self.precond, VPPrecond):  # in the network's dtype, as NVlabs computes it
            c_noise = self.precond.c_noise(sigma.to(dtype))
        F_x = self.net((c_in * x).to(dtype), c_noise.flatten().to(dtype), class_labels=class_labels,
                       augment_labels=augment_labels)
        D_x = c_skip * x + c_out * F_x[:, : x.shape[1]].to(x.dtype)
        if not return_logvar:
            return D_x
        return D_x, self.logvar(c_noise).reshape(sigma.shape).to(x.dtype)

    def logvar(self, c_noise: torch.Tensor) -> torch.Tensor:
        """u(sigma), EDM2's learned log-variance of the loss at c_noise (EDM2 eq. 21), one per item."""
        if not hasattr(self, "logvar_linear"):
            raise ValueError("this denoiser has no uncertainty head: build it with logvar_channels > 0 "
                             "(precond=edm2) to train with loss=edm2")
        return self.logvar_linear(self.logvar_fourier(c_noise.flatten().to(torch.float32)))
