"""Toy 2-D datasets: Gaussian mixtures with known ideal denoisers, plus two moons and a swiss roll."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.utils.data import Dataset

from edmlab.analytic import GaussianMixture


def _ring8(radius: float = 1.0, std: float = 0.05):
    """8 equal Gaussians evenly spaced on a circle."""
    angles = 2 * math.pi * np.arange(8) / 8
    return np.full(8, 1 / 8), radius * np.stack([np.cos(angles), np.sin(angles)], 1), np.full(8, std)


def _gmm(std: float = 0.1):
    """3 unequal Gaussians (weights 0.5, 0.25, 0.25): tests that samplers keep mode weights."""
    means = np.array([[-0.8, -0.4], [0.8, -0.4], [0.0, 0.7]])
    return np.array([0.5, 0.25, 0.25]), means, np.full(3, std)


MIXTURES = {"ring8": _ring8, "gmm": _gmm}
NAMES = (*MIXTURES, "moons", "swissroll")


class Toy2DDataset(Dataset):
    """n points float32 [n, 2] drawn once with `seed`; labels are the mixture component / moon (else none)."""

    def __init__(self,
                 name: str = "ring8",   # ring8 | gmm | moons | swissroll
                 n: int = 65536,        # number of points
                 seed: int = 0,         # draws are a function of the seed only
                 **params) -> None:     # shape parameters: ring8 radius/std, gmm std, moons/swissroll noise
        if name not in NAMES:
            raise ValueError(f"unknown toy dataset {name!r}; valid names: {', '.join(NAMES)}")
        self.name, self.params = name, params
        if name in MIXTURES:
            gmm = self.mixture()
            points, comps = gmm.sample(n, generator=torch.Generator().manual_seed(seed), return_components=True)
            self.points, self.raw_labels = points.float().numpy(), comps.numpy().astype(np.int64)
        elif name == "moons":
            from sklearn.datasets import make_moons

            points, labels = make_moons(n, noise=params.get("noise", 0.05), random_state=seed)
            self.points, self.raw_labels = ((points - [0.5, 0.25]) / 2).astype(np.float32), labels.astype(np.int64)
        else:
            from sklearn.datasets import make_swiss_roll

            points, _ = make_swiss_roll(n, noise=params.get("noise", 0.5), random_state=seed)
            self.points, self.raw_labels = (points[:, [0, 2]] / 15).astype(np.float32), None
        self.label_dim = 0 if self.raw_labels is None else int(self.raw_labels.max()) + 1
        if name in MIXTURES:
            self.label_dim = len(gmm.weights)

    def mixture(self) -> GaussianMixture | None:
        """The exact data law for mixtures (its ideal denoiser is closed-form), else None."""
        if self.name not in MIXTURES:
            return None
        return GaussianMixture(*MIXTURES[self.name](**self.params))

    @property
    def dim(self) -> int:
        return self.points.shape[1]

    def __len__(self) -> int:
        return len(self.points)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        label = torch.zeros(self.label_dim)
        if self.raw_labels is not None:
            label[int(self.raw_labels[index])] = 1
        return torch.from_numpy(self.points[index]), label
