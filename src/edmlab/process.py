"""Noise processes: the marginal p(x_t | x_0) = N(s(t) x_0, s(t)^2 sigma(t)^2 I).

A process is the pair (s, sigma); the SDE dx = f x dt + g dw with the same
marginals follows from it (Karras et al. 2022, Sec. 2 and App. B.2):

    f = s'/s,    g = s sqrt(2 sigma sigma'),
    s(t) = exp(int_0^t f),    sigma(t)^2 = int_0^t g^2 / s^2.

Every method takes a Python float or a float32/float64 tensor and returns the
same kind. Subclasses give closed forms; the base class falls back to autograd
for derivatives and to bisection for the inverse of sigma.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import torch

Scalar = float | torch.Tensor
TensorFn = Callable[[torch.Tensor], torch.Tensor]

__all__ = ["NoiseProcess", "VP", "VE", "EDM", "FM", "get", "from_schedule", "from_sde", "NAMES"]


def _scalar_io(fn: Callable) -> Callable:
    """Let a tensor method accept Python floats (computed in float64, returned as float)."""

    @functools.wraps(fn)
    def wrapper(self, x):
        if isinstance(x, torch.Tensor):
            return fn(self, x)
        return float(fn(self, torch.as_tensor(float(x), dtype=torch.float64)))

    return wrapper


def _autograd_deriv(fn: TensorFn, t: torch.Tensor) -> torch.Tensor:
    """Elementwise d fn / dt by autograd (fn must act elementwise)."""
    with torch.enable_grad():
        t_ = t.detach().clone().requires_grad_(True)
        y = fn(t_)
        if not y.requires_grad:  # fn does not depend on t
            return torch.zeros_like(t)
        (grad,) = torch.autograd.grad(y.sum(), t_)
    return grad.detach()


class NoiseProcess:
    """p(x_t|x_0) = N(s(t) x_0, s(t)^2 sigma(t)^2 I) on t in [t_min, t_max]."""

    name = "custom"

    def __init__(self, t_min: float, t_max: float) -> None:
        if not t_min < t_max:
            raise ValueError(f"t_min must be < t_max, got {t_min} >= {t_max}")
        self.t_min = float(t_min)
        self.t_max = float(t_max)

    # --- the schedule: subclasses implement _s and _sigma (tensors in, tensors out)
    def _s(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _sigma(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _s_deriv(self, t: torch.Tensor) -> torch.Tensor:
        return _autograd_deriv(self._s, t)

    def _sigma_deriv(self, t: torch.Tensor) -> torch.Tensor:
        return _autograd_deriv(self._sigma, t)

    def _sigma_inv(self, sigma: torch.Tensor) -> torch.Tensor:
        """Bisection on the monotone sigma(t) over [0, t_max] in float64."""
        target = sigma.to(torch.float64)
        lo = torch.zeros_like(target)
        hi = torch.full_like(target, self.t_max)
        for _ in range(200):  # past float64 resolution for any bracket
            mid = (lo + hi) / 2
            below = self._sigma(mid) < target
            lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
        return ((lo + hi) / 2).to(sigma.dtype)

    # --- public API
    @_scalar_io
    def s(self, t: Scalar) -> Scalar:
        """Signal scale s(t)."""
        return self._s(t)

    @_scalar_io
    def sigma(self, t: Scalar) -> Scalar:
        """Noise level sigma(t) of the scaled state x / s(t)."""
        return self._sigma(t)

    @_scalar_io
    def s_deriv(self, t: Scalar) -> Scalar:
        """s'(t)."""
        return self._s_deriv(t)

    @_scalar_io
    def sigma_deriv(self, t: Scalar) -> Scalar:
        """sigma'(t)."""
        return self._sigma_deriv(t)

    @_scalar_io
    def sigma_inv(self, sigma: Scalar) -> Scalar:
        """t such that sigma(t) = sigma."""
        return self._sigma_inv(sigma)

    @_scalar_io
    def f(self, t: Scalar) -> Scalar:
        """Drift coefficient f(t) = s'(t)/s(t) : the mean s(t) x_0 decays by it."""
        return self._s_deriv(t) / self._s(t)

    @_scalar_io
    def g(self, t: Scalar) -> Scalar:
        """Diffusion coefficient g(t) = s(t) sqrt(2 sigma(t) sigma'(t)) : the variance s^2 sigma^2 grows by it."""
        return self._s(t) * torch.sqrt(2 * self._sigma(t) * self._sigma_deriv(t))

    @property
    def sigma_min(self) -> float:
        return self.sigma(self.t_min)

    @property
    def sigma_max(self) -> float:
        return self.sigma(self.t_max)

    def marginal(self, x0: torch.Tensor, t: Scalar, noise: torch.Tensor) -> torch.Tensor:
        """A draw of x_t = s(t) (x_0 + sigma(t) noise) given unit Gaussian noise."""
        t = torch.as_tensor(t, dtype=x0.dtype, device=x0.device)
        t = t.reshape(-1, *([1] * (x0.ndim - 1))) if t.ndim else t
        return self.s(t) * (x0 + self.sigma(t) * noise)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(t_min={self.t_min:g}, t_max={self.t_max:g})"


class VP(NoiseProcess):
    """Variance preserving (DDPM/DDIM): s = 1/sqrt(1+sigma^2), sigma = sqrt(e^{beta_d t^2/2 + beta_min t} - 1)."""

    name = "vp"

    def __init__(self, beta_d: float = 19.9, beta_min: float = 0.1, t_min: float = 1e-3, t_max: float = 1.0):
        super().__init__(t_min, t_max)
        self.beta_d, self.beta_min = float(beta_d), float(beta_min)

    def _exponent(self, t):
        return 0.5 * self.beta_d * t**2 + self.beta_min * t

    def _beta(self, t):
        """beta(t) = beta_min + beta_d t, so that f = -beta/2, g = sqrt(beta)."""
        return self.beta_min + self.beta_d * t

    def _s(self, t):
        return torch.exp(-0.5 * self._exponent(t))

    def _sigma(self, t):
        return torch.sqrt(torch.expm1(self._exponent(t)))

    def _sigma_deriv(self, t):
        sigma = self._sigma(t)
        return self._beta(t) * (sigma + 1 / sigma) / 2

    def _s_deriv(self, t):
        return -0.5 * self._beta(t) * self._s(t)

    def _sigma_inv(self, sigma):
        return (torch.sqrt(self.beta_min**2 + 2 * self.beta_d * torch.log1p(sigma**2)) - self.beta_min) / self.beta_d


class VE(NoiseProcess):
    """Variance exploding (SMLD): s = 1, sigma = sqrt(t)."""

    name = "ve"

    def __init__(self, sigma_min: float = 0.02, sigma_max: float = 100.0):
        super().__init__(sigma_min**2, sigma_max**2)

    def _s(self, t):
        return torch.ones_like(t)

    def _sigma(self, t):
        return torch.sqrt(t)

    def _s_deriv(self, t):
        return torch.zeros_like(t)

    def _sigma_deriv(self, t):
        return 0.5 / torch.sqrt(t)

    def _sigma_inv(self, sigma):
        return sigma**2


class EDM(NoiseProcess):
    """EDM: s = 1, sigma = t."""

    name = "edm"

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0):
        super().__init__(sigma_min, sigma_max)

    def _s(self, t):
        return torch.ones_like(t)

    def _sigma(self, t):
        return t.clone()

    def _s_deriv(self, t):
        return torch.zeros_like(t)

    def _sigma_deriv(self, t):
        return torch.ones_like(t)

    def _sigma_inv(self, sigma):
        return sigma.clone()


class FM(NoiseProcess):
    """Rectified flow x_t = (1-t) x_0 + t eps: s = 1 - t, sigma = t/(1-t).

    t = 1 is pure noise with sigma = inf; the default range is truncated to EDM's
    sigma in [0.002, 80] so that the same denoiser and steps apply.
    """

    name = "fm"

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0):
        super().__init__(sigma_min / (1 + sigma_min), sigma_max / (1 + sigma_max))

    def _s(self, t):
        return 1 - t

    def _sigma(self, t):
        return t / (1 - t)

    def _s_deriv(self, t):
        return -torch.ones_like(t)

    def _sigma_deriv(self, t):
        return 1 / (1 - t) ** 2

    def _sigma_inv(self, sigma):
        return sigma / (1 + sigma)


class _Schedule(NoiseProcess):
    """A process given by user functions s(t), sigma(t) (optionally their derivatives and inverse)."""

    def __init__(self, s: TensorFn, sigma: TensorFn, t_min: float, t_max: float, s_deriv=None,
                 sigma_deriv=None, sigma_inv=None, name: str = "custom"):
        super().__init__(t_min, t_max)
        self.name = name
        self._s, self._sigma = s, sigma  # type: ignore[method-assign]
        for attr, fn in (("_s_deriv", s_deriv), ("_sigma_deriv", sigma_deriv), ("_sigma_inv", sigma_inv)):
            if fn is not None:
                setattr(self, attr, fn)


def from_schedule(s: TensorFn, sigma: TensorFn, *, t_min: float, t_max: float, s_deriv: TensorFn | None = None,
                  sigma_deriv: TensorFn | None = None, sigma_inv: TensorFn | None = None,
                  name: str = "custom") -> NoiseProcess:
    """A process from s(t) and sigma(t); missing derivatives by autograd, inverse by root-finding."""
    return _Schedule(s, sigma, t_min, t_max, s_deriv, sigma_deriv, sigma_inv, name)


class _SDE(NoiseProcess):
    """A process from SDE coefficients f(t), g(t): s and sigma by Gauss-Legendre quadrature from 0."""

    def __init__(self, f: TensorFn, g: TensorFn, t_min: float, t_max: float, nodes: int, name: str):
        super().__init__(t_min, t_max)
        self.name = name
        self._f_fn, self._g_fn = f, g
        x, w = np.polynomial.legendre.leggauss(nodes)
        self._x = torch.from_numpy((x + 1) / 2)  # nodes on [0, 1]
        self._w = torch.from_numpy(w / 2)

    def _integrate(self, fn: TensorFn, t: torch.Tensor) -> torch.Tensor:
        """int_0^t fn(r) dr, elementwise in t."""
        t64 = t.to(torch.float64)
        r = t64.unsqueeze(-1) * self._x.to(t.device)
        return (t64 * (fn(r) * self._w.to(t.device)).sum(-1)).to(t.dtype)

    def _log_s(self, t: torch.Tensor) -> torch.Tensor:
        return self._integrate(self._f_fn, t)

    def _s(self, t):
        return torch.exp(self._log_s(t))

    def _sigma(self, t):
        # r -> g(r)^2 / s(r)^2 with s(r) from a nested quadrature
        return torch.sqrt(self._integrate(lambda r: self._g_fn(r) ** 2 * torch.exp(-2 * self._log_s(r)), t))

    def _s_deriv(self, t):
        return self._f_fn(t) * self._s(t)

    def _sigma_deriv(self, t):
        return self._g_fn(t) ** 2 / (2 * self._s(t) ** 2 * self._sigma(t))

    @_scalar_io
    def f(self, t):
        """f(t) as given."""
        return self._f_fn(t)

    @_scalar_io
    def g(self, t):
        """g(t) as given."""
        return self._g_fn(t)


def from_sde(f: TensorFn, g: TensorFn, *, t_min: float, t_max: float, nodes: int = 96,
             name: str = "custom") -> NoiseProcess:
    """A process from dx = f(t) x dt + g(t) dw started at t = 0: s = e^{int f}, sigma^2 = int g^2/s^2."""
    return _SDE(f, g, t_min, t_max, nodes, name)


_BUILTIN: dict[str, type[NoiseProcess]] = {"vp": VP, "ve": VE, "edm": EDM, "fm": FM}
NAMES = tuple(_BUILTIN)


def get(name: str | NoiseProcess, **params) -> NoiseProcess:
    """A built-in process by name ("vp", "ve", "edm", "fm") with EDM's constants as defaults."""
    if isinstance(name, NoiseProcess):
        return name
    if name not in _BUILTIN:
        raise ValueError(f"unknown process {name!r}; valid names: {', '.join(NAMES)}")
    return _BUILTIN[name](**params)

