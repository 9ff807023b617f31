"""edmlab.data.augment: EDM's augmentation pipe, its labels, and the exactness of its geometric resampling."""

from __future__ import annotations

import math

import torch

from edmlab.data import AugmentPipe
from edmlab.data.augment import affine_resample, rotate2d, translate2d


def test_augment_p0_is_identity():
    x = torch.rand(16, 3, 8, 8) * 2 - 1
    y, labels = AugmentPipe(p=0)(x)
    assert torch.equal(y, x) and torch.equal(labels, torch.zeros(16, 9))
    assert AugmentPipe().augment_dim == 9


def test_augment_xflip_fires_half_the_time_and_labels_it():
    x = torch.rand(4000, 1, 4, 4)
    pipe = AugmentPipe(p=0.12, yflip=0, scale=0, rotate_frac=0, aniso=0, translate_frac=0)
    y, labels = pipe(x, generator=torch.Generator().manual_seed(0))
    flipped = labels[:, 0] == 1
    assert labels.shape == (4000, 1) and abs(flipped.float().mean() - 0.5) < 4 * math.sqrt(0.25 / 4000)
    assert torch.equal(y[flipped], x[flipped].flip(3)) and torch.equal(y[~flipped], x[~flipped])


def test_augment_label_layout():
    """9-d layout [xflip, yflip, scale, cos-1, sin, aniso w cos r, w sin r, tx, ty] on the default pipe."""
    x = torch.rand(3000, 2, 8, 8)
    y, labels = AugmentPipe(p=0.12)(x, generator=torch.Generator().manual_seed(1))
    geometric = (labels[:, 2:] != 0).any(1)
    pure_x = (labels[:, 0] == 1) & (labels[:, 1] == 0) & ~geometric
    none = (labels == 0).all(1)
    assert pure_x.sum() > 100 and none.sum() > 100
    assert torch.equal(y[pure_x], x[pure_x].flip(3)) and torch.equal(y[none], x[none])
    rot = labels[:, 3:5]  # (cos w - 1, sin w) lies on the unit circle shifted by (-1, 0)
    assert torch.allclose((rot[:, 0] + 1) ** 2 + rot[:, 1] ** 2, torch.ones(3000), atol=1e-5)
    # each geometric transform fires with p = 0.12
    for cols in ([2], [3, 4], [5, 6], [7, 8]):
        rate = (labels[:, cols] != 0).any(1).float().mean()
        assert abs(rate - 0.12) < 4 * math.sqrt(0.12 * 0.88 / 3000), (cols, rate)


def _blob(centre: tuple[float, float], size: int = 32) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(size.__float__()), torch.arange(size.__float__()), indexing="ij")
    c = (size - 1) / 2
    return torch.exp(-((xx - c - centre[0]) ** 2 + (yy - c - centre[1]) ** 2) / (2 * 1.5**2))[None, None]


def _centroid(img: torch.Tensor, radius: float = 11) -> torch.Tensor:
    """Centre of mass within `radius` of the centre (beyond it reflect padding shows mirrored blobs)."""
    c = torch.arange(float(img.shape[-1])) - (img.shape[-1] - 1) / 2
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    w = img[0, 0] * (xx**2 + yy**2 < radius**2)
    return torch.stack([(w * xx).sum(), (w * yy).sum()]) / w.sum()


def test_augment_translation_and_rotation_match_their_labels():
    g = torch.Generator().manual_seed(2)
    shift = AugmentPipe(p=1, xflip=0, yflip=0, scale=0, rotate_frac=0, aniso=0, translate_frac=1)
    rotate = AugmentPipe(p=1, xflip=0, yflip=0, scale=0, rotate_frac=1, aniso=0, translate_frac=0)
    for _ in range(5):
        x = _blob((0, 0)).expand(1, 1, 32, 32)
        y, labels = shift(x, generator=g)
        t = labels[0] * 32 * 0.125  # content moves by +t pixels
        if t.abs().max() < 5:
            assert torch.allclose(_centroid(y), t, atol=0.02)
        y, labels = rotate(_blob((6, 0)), generator=g)
        w = torch.atan2(labels[0, 1], labels[0, 0] + 1)  # content turns by -w (G_inv = R(w))
        assert torch.allclose(_centroid(y), 6 * torch.stack([w.cos(), -w.sin()]), atol=0.02)


def test_affine_resample_identity_and_integer_shift_are_exact():
    x = torch.randn(2, 3, 16, 16)
    assert torch.allclose(affine_resample(x, torch.eye(3).expand(2, 3, 3)), x, atol=1e-5)
    y = affine_resample(x, translate2d(torch.full((2,), -2.0), torch.zeros(2)))
    assert torch.allclose(y[..., 2:], x[..., :-2], atol=1e-5)
    assert torch.allclose(y[..., :2], x[..., [2, 1]], atol=1e-5)  # reflect padding at the border
    u = torch.linspace(-1, 1, 32)
    smooth = (torch.sin(2 * u) * torch.cos(1.5 * u[:, None]) + u / 2).expand(1, 1, 32, 32)
    y = affine_resample(smooth, rotate2d(torch.tensor([math.pi / 2])))
    err = (y - smooth.rot90(1, (2, 3))).abs()[0, 0]  # not exact: sym6 is only near-symmetric
    assert err.max() < 0.01 and err[4:-4, 4:-4].max() < 1e-3
