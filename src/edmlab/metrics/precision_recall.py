"""Improved precision and recall (Kynkaanniemi et al. 2019) on feature vectors.

Each set's manifold is the union of balls around its points, the radius of a point being the distance
to its k-th nearest neighbour in the same set (k = 3 in the paper). Precision = share of generated
samples inside the real manifold; recall = share of real samples inside the generated manifold.
Distances are computed block by block, so N x M distance matrices are never held whole.
"""

from __future__ import annotations

import numpy as np
import torch

BLOCK = 4096  # rows/columns per distance block: 4096^2 float32 = 64 MiB


def _as_tensor(x: np.ndarray | torch.Tensor, device: torch.device | str | None,
               dtype: torch.dtype) -> torch.Tensor:
    x = torch.as_tensor(x).to(device=device, dtype=dtype)
    if x.ndim != 2:
        raise ValueError(f"features must be [N, D], got shape {tuple(x.shape)}")
    return x


def squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """||a_i - b_j||^2 for a [N, D], b [M, D] -> [N, M], via the Gram matrix (as the reference code)."""
    return (a.square().sum(1, keepdim=True) - 2 * a @ b.T + b.square().sum(1)).clamp_min_(0)


def knn_sq_radii(features: torch.Tensor, k: int = 3, block: int = BLOCK) -> torch.Tensor:
    """Squared distance of each point to its k-th nearest neighbour in the same set (itself excluded)."""
    if not 1 <= k < len(features):
        raise ValueError(f"k={k} needs at least k + 1 = {k + 1} points, got {len(features)}")
    radii = []
    for rows in features.split(block):
        # The k+1 smallest of each column block hold the k+1 smallest overall; the smallest is the point.
        candidates = torch.cat([squared_distances(rows, cols).topk(min(k + 1, len(cols)), dim=1,
                                                                   largest=False).values
                                for cols in features.split(block)], dim=1)
        radii.append(candidates.kthvalue(k + 1, dim=1).values)
    return torch.cat(radii)


def knn_radii(features: np.ndarray | torch.Tensor, k: int = 3, block: int = BLOCK,
              device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Distance of each point to its k-th nearest neighbour in the same set (Kynkaanniemi et al. eq. 2)."""
    return knn_sq_radii(_as_tensor(features, device, dtype), k, block).sqrt()


def in_manifold(queries: torch.Tensor, support: torch.Tensor, sq_radii: torch.Tensor,
                block: int = BLOCK) -> torch.Tensor:
    """f(q, support) of eq. 1: bool [M], whether query q lies within radius_j of some support point j."""
    hits = []
    for q in queries.split(block):
        hit = torch.zeros(len(q), dtype=torch.bool, device=q.device)
        for s, r in zip(support.split(block), sq_radii.split(block), strict=True):
            hit |= (squared_distances(q, s) <= r).any(dim=1)
        hits.append(hit)
    return torch.cat(hits)


def precision_recall(real: np.ndarray | torch.Tensor, fake: np.ndarray | torch.Tensor, k: int = 3,
                     block: int = BLOCK, device: torch.device | str | None = None,
                     dtype: torch.dtype = torch.float32) -> tuple[float, float]:
    """(precision, recall) of generated features `fake` [M, D] against real features `real` [N, D]."""
    real, fake = _as_tensor(real, device, dtype), _as_tensor(fake, device, dtype)
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature dims differ: real {real.shape[1]}, fake {fake.shape[1]}")
    precision = in_manifold(fake, real, knn_sq_radii(real, k, block), block).double().mean().item()
    recall = in_manifold(real, fake, knn_sq_radii(fake, k, block), block).double().mean().item()
    return precision, recall
