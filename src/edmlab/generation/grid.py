"""Image grids: the training preview's samples, and pictures of samples (a grid of images, a 2-D scatter plot).

The preview draws seed `seed + i` exactly as sample.py does (`generate_batch`: latents, class draw, sampler
noise), so its image for seed s and class c is sample.py's image for seed s with class_labels=c.
Images become pixels through `edmlab.generation.pixels.to_uint8` (EDM's rounding).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageDraw
import torch

from edmlab.fileio import atomic_write
from edmlab.generation.batches import Sampler, generate_batch
from edmlab.generation.pixels import to_uint8

__all__ = ["preview_samples", "image_grid", "scatter_plot", "render", "save_png"]

_PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
            (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


@torch.no_grad()
def preview_samples(denoiser: torch.nn.Module, sampler: Sampler, shape: Sequence[int], *, per_class: int = 10,
                    num_unconditional: int = 64, seed: int = 0,
                    device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The preview grid's samples [n, *shape] for seeds seed, seed + 1, ... and their classes [n] (or None).

    A conditional network gives `per_class` seeds to each class in turn (row r = class r); an unconditional one
    `num_unconditional` seeds.
    """
    label_dim = int(getattr(denoiser, "label_dim", 0))
    n = label_dim * per_class if label_dim else num_unconditional
    classes = [c for c in range(label_dim) for _ in range(per_class)] if label_dim else "random"
    return generate_batch(denoiser, range(seed, seed + n), sampler, shape=shape, class_labels=classes, device=device)


def image_grid(images: torch.Tensor, ncol: int, pad: int = 1) -> PIL.Image.Image:
    """A [n, C, H, W] batch in [-1, 1] as one grid image, row-major with `ncol` columns."""
    n, c, h, w = images.shape
    nrow = math.ceil(n / ncol)
    pix = to_uint8(images).cpu().numpy()
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
    """2-D points [n, 2] on a white square, coloured by class (class indices [n])."""
    xy = points.detach().float().cpu().numpy()
    if extent is None:
        finite = xy[np.isfinite(xy).all(1)]
        extent = float(np.abs(finite).max()) * 1.1 if len(finite) else 1.0
    img = PIL.Image.new("RGB", (size, size), "white")
    draw = PIL.ImageDraw.Draw(img)
    cls = labels.cpu().numpy() if labels is not None else np.zeros(len(xy), dtype=int)
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
