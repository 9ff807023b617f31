"""Ideal denoisers in closed form, and a reference ODE solve.

For data p_0 = sum_k w_k N(mu_k, Sigma_k), the noised law at sigma is
sum_k w_k N(mu_k, Sigma_k + sigma^2 I) and the ideal denoiser (the posterior mean E[x_0 | x]) is

    D(x; sigma) = sum_k r_k(x) [mu_k + Sigma_k (Sigma_k + sigma^2 I)^-1 (x - mu_k)].

A finite point set is the special case Sigma_k = 0. Both are usable wherever a
`Denoiser` is: they satisfy `edmlab.precond.DenoiserLike` (defined for every sigma, unconditional).
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["GaussianMixture", "FiniteSet", "Gaussian", "ode_reference"]


def _sigma_column(sigma, n: int) -> torch.Tensor:
    """sigma as a float64 [n, 1] column (scalar or one value per item)."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    return sigma.reshape(-1, 1).expand(n, 1)


class GaussianMixture:
    """sum_k w_k N(mu_k, Sigma_k); stds may be scalars (isotropic), vectors (diagonal) or full covariances."""

    sigma_min, sigma_max = 0.0, math.inf
    label_dim = 0

    def __init__(self, weights, means, stds_or_covs) -> None:
        self.weights = torch.as_tensor(weights, dtype=torch.float64)
        self.weights = self.weights / self.weights.sum()
        self.means = torch.as_tensor(means, dtype=torch.float64)
        K, d = self.means.shape
        self.data_shape = (d,)
        c = torch.as_tensor(stds_or_covs, dtype=torch.float64)
        if c.ndim <= 1:  # one std per component
            c = c.expand(K).reshape(K, 1, 1) ** 2 * torch.eye(d, dtype=torch.float64)
        elif c.ndim == 2:  # per-coordinate stds
            c = torch.diag_embed(c**2)
        if c.shape != (K, d, d):
            raise ValueError(f"covariances must be [K], [K, d] or [K, d, d] with K={K}, d={d}; got {tuple(c.shape)}")
        self.covs = c
        # Sigma_k = U diag(lam) U^T makes every (Sigma_k + sigma^2 I)^-1 diagonal in the k-th frame.
        self.lam, self.U = torch.linalg.eigh(c)
        self.lam = self.lam.clamp(min=0)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def round_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        """Every sigma is representable: the identity."""
        return sigma

    def sample(self, n: int, generator: torch.Generator | None = None, return_components: bool = False):
        """n draws from the data law (float64), optionally with their component indices."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        x = self.means[k] + torch.einsum("nij,nj->ni", self.U[k], self.lam[k].sqrt() * z)
        return (x, k) if return_components else x

    def _posterior(self, x: torch.Tensor, sigma):
        """Per component: log w_k N(x; mu_k, Sigma_k + sigma^2 I) [n,K] and the posterior means [n,K,d]."""
        x = x.to(torch.float64)
        var = self.lam + _sigma_column(sigma, x.shape[0]).unsqueeze(-1) ** 2  # [n,K,d]
        z = torch.einsum("kji,nkj->nki", self.U, x.unsqueeze(1) - self.means)  # x - mu_k in the k-th frame
        log_det = var.log().sum(-1) + self.dim * math.log(2 * math.pi)
        log_p = self.weights.log() - 0.5 * ((z**2 / var).sum(-1) + log_det)
        mean = self.means + torch.einsum("kij,nkj->nki", self.U, self.lam / var * z)
        return log_p, mean

    def log_prob(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """log p(x; sigma) of the data law convolved with N(0, sigma^2 I)."""
        log_p, _ = self._posterior(x.flatten(1), sigma)
        return log_p.logsumexp(-1)

    def denoiser(self, x: torch.Tensor, sigma, class_labels=None) -> torch.Tensor:
        """The ideal D(x; sigma) = E[x_0 | x], posterior-weighted component means."""
        log_p, mean = self._posterior(x.flatten(1), sigma)
        D = torch.einsum("nk,nkd->nd", log_p.softmax(-1), mean)
        return D.reshape(x.shape).to(x.dtype)

    __call__ = denoiser

    def score(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """grad_x log p(x; sigma) = (D(x; sigma) - x) / sigma^2 (Tweedie)."""
        sigma = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        return (self.denoiser(x, sigma.flatten()) - x) / sigma**2


class Gaussian(GaussianMixture):
    """N(0, c^2 I) in d dimensions, whose ideal denoiser is c^2/(c^2+sigma^2) x."""

    def __init__(self, c: float, dim: int) -> None:
        super().__init__([1.0], torch.zeros(1, dim), [c])


class FiniteSet(GaussianMixture):
    """The empirical law of a finite set of points: D is a softmax-weighted mean of the points."""

    def __init__(self, points) -> None:
        points = torch.as_tensor(points, dtype=torch.float64)
        self.data_shape = tuple(points.shape[1:])  # the points' own shape, e.g. [C, H, W] images
        points = points.flatten(1)
        self.weights = torch.full((points.shape[0],), 1 / points.shape[0], dtype=torch.float64)
        self.means = points

    def sample(self, n: int, generator: torch.Generator | None = None, return_components: bool = False):
        k = torch.randint(self.means.shape[0], (n,), generator=generator)
        return (self.means[k], k) if return_components else self.means[k]

    def _posterior(self, x, sigma):
        x = x.to(torch.float64)
        s2 = _sigma_column(sigma, x.shape[0]) ** 2
        dist2 = torch.cdist(x, self.means).square()  # [n, K]
        log_p = self.weights.log() - 0.5 * dist2 / s2 - 0.5 * self.dim * (2 * math.pi * s2).log()
        return log_p, self.means.expand(x.shape[0], *self.means.shape)

    def denoiser(self, x, sigma, class_labels=None):
        log_p, _ = self._posterior(x.flatten(1), sigma)
        return (log_p.softmax(-1) @ self.means).reshape(x.shape).to(x.dtype)

    __call__ = denoiser


def ode_reference(denoiser, latents: torch.Tensor, sigma_max: float, sigma_min: float, *, rtol: float = 1e-10,
                  atol: float = 1e-12, class_labels=None) -> torch.Tensor:
    """High-accuracy solve of dx/dsigma = (x - D(x; sigma))/sigma from sigma_max to sigma_min, then D at sigma_min.

    Integrated in ln sigma (dx/d ln sigma = x - D) with scipy's DOP853, starting
    from sigma_max * latents; the final step to sigma = 0 is the denoiser output,
    as every edmlab sampler ends.
    """
    from scipy.integrate import solve_ivp

    shape = latents.shape

    def rhs(log_sigma: float, y: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(y).reshape(shape)
        with torch.no_grad():
            D = denoiser(x, math.exp(log_sigma), class_labels=class_labels)
        return (x - D.to(torch.float64)).reshape(-1).numpy()

    y0 = (latents.to(torch.float64) * sigma_max).reshape(-1).numpy()
    sol = solve_ivp(rhs, (math.log(sigma_max), math.log(sigma_min)), y0, method="DOP853", rtol=rtol, atol=atol)
    if not sol.success:
        raise RuntimeError(f"reference ODE solve failed: {sol.message}")
    x = torch.from_numpy(sol.y[:, -1].copy()).reshape(shape)
    with torch.no_grad():
        return denoiser(x, sigma_min, class_labels=class_labels).to(torch.float64)
