"""Training losses: E_{y, sigma, n} lambda(sigma) ||D(y + n; sigma) - y||^2 (EDM eq. 8).

A recipe is the training distribution of sigma plus the weight lambda(sigma).
Draw order follows EDM's `training/loss.py` (sigma, augmentation, noise) so
runs replay exactly.
"""

from __future__ import annotations

import torch

from edmlab.process import VP

__all__ = ["Recipe", "EDMLoss", "EDM2Loss", "VPLoss", "VELoss", "FMLoss", "get", "denoising_loss", "NAMES"]


class Recipe:
    """A sigma distribution and a weighting lambda(sigma)."""

    name = "none"
    uncertainty = False  # True: the denoiser also learns the loss's log-variance u(sigma) (EDM2)

    def sample_sigma(self, n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        raise NotImplementedError

    def weight(self, sigma: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class EDMLoss(Recipe):
    """ln sigma ~ N(P_mean, P_std^2), lambda = (sigma^2 + sd^2) / (sigma sd)^2 (EDM Table 1)."""

    name = "edm"

    def __init__(self, P_mean: float = -1.2, P_std: float = 1.2, sigma_data: float = 0.5):
        self.P_mean, self.P_std, self.sigma_data = P_mean, P_std, sigma_data

    def sample_sigma(self, n, generator=None, device=None):
        return (torch.randn(n, generator=generator, device=device) * self.P_std + self.P_mean).exp()

    def weight(self, sigma):
        return (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2


class EDM2Loss(EDMLoss):
    """EDM's sigma law and lambda with EDM2's learned uncertainty: lambda/e^u ||D - y||^2 + d u (EDM2 eq. 21).

    u(sigma) is the denoiser's log-variance head (precond=edm2); d is the number of elements per item,
    as NVlabs/edm2 adds u to every element's loss. Defaults are the ImageNet-512 latent preset.
    """

    name = "edm2"
    uncertainty = True

    def __init__(self, P_mean: float = -0.4, P_std: float = 1.0, sigma_data: float = 0.5):
        super().__init__(P_mean, P_std, sigma_data)


class VPLoss(Recipe):
    """t ~ U(epsilon_t, 1), sigma = sigma_VP(t), lambda = 1/sigma^2 (EDM Table 1, VP)."""

    name = "vp"

    def __init__(self, beta_d: float = 19.9, beta_min: float = 0.1, epsilon_t: float = 1e-5):
        self.process, self.epsilon_t = VP(beta_d, beta_min), epsilon_t

    def sample_sigma(self, n, generator=None, device=None):
        t = 1 + torch.rand(n, generator=generator, device=device) * (self.epsilon_t - 1)
        return self.process.sigma(t)

    def weight(self, sigma):
        return 1 / sigma**2


class VELoss(Recipe):
    """ln sigma ~ U(ln sigma_min, ln sigma_max), lambda = 1/sigma^2 (EDM Table 1, VE)."""

    name = "ve"

    def __init__(self, sigma_min: float = 0.02, sigma_max: float = 100.0):
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def sample_sigma(self, n, generator=None, device=None):
        u = torch.rand(n, generator=generator, device=device)
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** u

    def weight(self, sigma):
        return 1 / sigma**2


class FMLoss(Recipe):
    """t ~ U(0,1) or logit-normal, sigma = t/(1-t), lambda = ((1+sigma)/sigma)^2: the velocity MSE."""

    name = "fm"

    def __init__(self, schedule: str = "uniform", mean: float = 0.0, std: float = 1.0, eps: float = 1e-5):
        if schedule not in ("uniform", "logit_normal"):
            raise ValueError(f"unknown fm schedule {schedule!r}; valid: uniform, logit_normal")
        self.schedule, self.mean, self.std, self.eps = schedule, mean, std, eps

    def sample_sigma(self, n, generator=None, device=None):
        if self.schedule == "uniform":
            t = torch.rand(n, generator=generator, device=device)
        else:  # Esser et al. 2024, eq. 19
            t = torch.sigmoid(torch.randn(n, generator=generator, device=device) * self.std + self.mean)
        t = t.clamp(self.eps, 1 - self.eps)  # sigma = 0 and sigma = inf carry no signal
        return t / (1 - t)

    def weight(self, sigma):
        return ((1 + sigma) / sigma) ** 2


_RECIPES: dict[str, type[Recipe]] = {c.name: c for c in (VPLoss, VELoss, EDMLoss, FMLoss, EDM2Loss)}
NAMES = tuple(_RECIPES)


def get(name: str, **params) -> Recipe:
    """A training recipe by name: "vp", "ve", "edm", "fm", "edm2"."""
    if name not in _RECIPES:
        raise ValueError(f"unknown loss {name!r}; valid names: {', '.join(NAMES)}")
    return _RECIPES[name](**params)


def denoising_loss(denoiser, images: torch.Tensor, recipe: Recipe, class_labels: torch.Tensor | None = None,
                   generator: torch.Generator | None = None, augment_pipe=None,
                   sigma: torch.Tensor | None = None) -> torch.Tensor:
    """Per-item lambda(sigma) ||D(y + n; sigma) - y||^2, summed over non-batch dims (EDM eq. 8).

    `sigma` overrides the recipe's draw (e.g. to evaluate at a fixed noise level); `augment_pipe(images,
    generator=...)` returns (augmented images, augment labels) and its target is the augmented image.
    """
    n = images.shape[0]
    if sigma is None:
        sigma = recipe.sample_sigma(n, generator=generator, device=images.device)
    sigma = torch.as_tensor(sigma, dtype=images.dtype, device=images.device).expand(n)
    y, augment_labels = augment_pipe(images, generator=generator) if augment_pipe is not None else (images, None)
    noise = torch.randn(y.shape, generator=generator, device=y.device, dtype=y.dtype)
    view = sigma.reshape(-1, *([1] * (y.ndim - 1)))
    extra = {} if augment_labels is None else {"augment_labels": augment_labels}
    if getattr(recipe, "uncertainty", False):  # EDM2 eq. 21: the weight is learned per sigma
        D_yn, u = denoiser(y + view * noise, sigma, class_labels=class_labels, return_logvar=True, **extra)
        u = u.flatten()
        return recipe.weight(sigma) / u.exp() * (D_yn - y).square().flatten(1).sum(1) + y[0].numel() * u
    D_yn = denoiser(y + view * noise, sigma, class_labels=class_labels, **extra)
    return recipe.weight(sigma) * (D_yn - y).square().flatten(1).sum(1)

