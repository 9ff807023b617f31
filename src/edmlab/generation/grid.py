"""Fixed-seed sample grids: one row per class for conditional models, drawn with per-seed generators.

Images become a PIL grid (pixels = clip(x * 127.5 + 128, 0, 255), EDM `generate.py`);
2-D points become a scatter plot coloured by class.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageDraw
import torch

from edmlab.fileio import atomic_write

__all__ = ["sample_grid", "to_uint8", "image_grid", "scatter_plot", "render", "save_png"]

_PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
            (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


@torch.no_grad()
def sample_grid(denoiser: torch.nn.Module, sampler: Callable[..., torch.Tensor], data_shape: Sequence[int], *,
                label_dim: int, per_class: int = 10, num_unconditional: int = 64, seed: int = 0,
                device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Samples [n, *data_shape] for seeds seed, seed+1, ... and their class labels (row r = class r).

    Each image has its own generator (latents first, then the sampler's noise), so it depends
    only on its seed, not on the batch (EDM `generate.py`).
    """
    device = torch.device(device or next(denoiser.parameters()).device)
    n = label_dim * per_class if label_dim else num_unconditional
    gens = [torch.Generator(device=device).manual_seed(seed + i) for i in range(n)]
    latents = torch.stack([torch.randn(tuple(data_shape), generator=g, device=device) for g in gens])
    labels = None
    if label_dim:
        labels = torch.eye(label_dim, device=device).repeat_interleave(per_class, dim=0)
    images = sampler(denoiser, latents, class_labels=labels, generator=gens)
    return images, labels


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] float -> uint8 with EDM's rounding (x * 127.5 + 128, clipped, truncated)."""
    return (images.float() * 127.5 + 128).clip(0, 255).to(torch.uint8).cpu().numpy()


def image_grid(images: torch.Tensor, ncol: int, pad: int = 1) -> PIL.Image.Image:
    """A [n, C, H, W] batch in [-1, 1] as one grid image, row-major with `ncol` columns."""
    n, c, h, w = images.shape
    nrow = math.ceil(n / ncol)
    pix = to_uint8(images)
    canvas = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, ncol)
        y, x = pad + r * (h + pad), pad + q * (w + pad)
        canvas[y:y + h, x:x + w] = pix[i].transpose(1, 2, 0)
    mode = {1: "L", 3: "RGB", 4: "RGBA"}.get(c)
    if mode is None:
        raise ValueError(f"cannot draw images with {c} channels (expected 1, 3 or 4)")
    return PIL.Image.fromarray(canvas[..., 0] if c == 1 else canvas, mode)


def scatter_plot(points: torch.Tensor, labels: torch.Tensor | None = None, size: int = 512,
                 extent: float | None = None) -> PIL.Image.Image:
    """2-D points [n, 2] on a white square, coloured by class (argmax of one-hot labels)."""
    xy = points.detach().float().cpu().numpy()
    if extent is None:
        finite = xy[np.isfinite(xy).all(1)]
        extent = float(np.abs(finite).max()) * 1.1 if len(finite) else 1.0
    img = PIL.Image.new("RGB", (size, size), "white")
    draw = PIL.ImageDraw.Draw(img)
    cls = labels.argmax(1).cpu().numpy() if labels is not None else np.zeros(len(xy), dtype=int)
    scale = (size - 1) / (2 * max(extent, 1e-12))
    for (x, y), k in zip(xy, cls, strict=True):
        if np.isfinite(x) and np.isfinite(y):
            u, v = (x + extent) * scale, (extent - y) * scale
            draw.ellipse([u - 1.5, v - 1.5, u + 1.5, v + 1.5], fill=_PALETTE[int(k) % len(_PALETTE)])
    return img


def render(samples: torch.Tensor, labels: torch.Tensor | None, per_class: int,
           scale: int = 1) -> PIL.Image.Image:
    """Images as a grid (one row per class when labelled) or 2-D points as a scatter plot."""
    if samples.ndim == 2:
        return scatter_plot(samples, labels)
    ncol = per_class if labels is not None else math.ceil(math.sqrt(len(samples)))
    grid = image_grid(samples, ncol)
    if scale > 1:
        grid = grid.resize((grid.width * scale, grid.height * scale), PIL.Image.NEAREST)
    return grid


def save_png(image: PIL.Image.Image, path: str | os.PathLike) -> Path:
    """Write a PNG atomically (edmlab.fileio), creating the folder."""
    path = Path(path)
    with atomic_write(path, fsync=False) as f:
        image.save(f, format="PNG")
    return path
