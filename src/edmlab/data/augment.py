"""EDM's non-leaking augmentation pipeline (Karras et al. 2022, Appendix F.2; ADA's geometric transforms).

Every transform fires per image with probability p x its multiplier and is reported in the augmentation
label, which conditions the network (`augment_dim`), so generated images need no augmentation at sampling
(augment labels zero). Label layout with the default transforms (9 values):
[xflip, yflip, scale w, cos(rot) - 1, sin(rot), w cos r, w sin r, tx / std, ty / std]; a disabled transform
(multiplier 0) drops its entries. Geometric transforms follow ADA/EDM: reflect padding, 2x upsampling with
the sym6 wavelet, bilinear `grid_sample`, sym6 downsampling; one deliberate difference: the sampling lattice
accounts for sym6's centroid delay, which removes EDM's ~0.1-pixel skew under rotation (identity and
integer translations are exact either way). Colour transforms are not implemented (EDM keeps them off).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Daubechies' least-asymmetric wavelet with 6 vanishing moments (low-pass decomposition filter).
SYM6 = (0.015404109327027373, 0.0034907120842174702, -0.11799011114819057, -0.048311742585633,
        0.4910559419267466, 0.787641141030194, 0.3379294217276218, -0.07263752278646252,
        -0.021060292512300564, 0.04472490177066578, 0.0017677118642428036, -0.007800708325034148)


def _matrix(rows: list[list], n: int, device) -> torch.Tensor:
    """[n, 3, 3] from rows of scalars or [n] tensors."""
    return torch.stack([torch.stack([torch.as_tensor(v, dtype=torch.float32, device=device).expand(n)
                                     for v in row], -1) for row in rows], -2)


def translate2d(tx: torch.Tensor, ty: torch.Tensor) -> torch.Tensor:
    return _matrix([[1, 0, tx], [0, 1, ty], [0, 0, 1]], tx.shape[0], tx.device)


def scale2d(sx: torch.Tensor, sy: torch.Tensor) -> torch.Tensor:
    return _matrix([[sx, 0, 0], [0, sy, 0], [0, 0, 1]], sx.shape[0], sx.device)


def rotate2d(theta: torch.Tensor) -> torch.Tensor:
    c, s = theta.cos(), theta.sin()
    return _matrix([[c, -s, 0], [s, c, 0], [0, 0, 1]], theta.shape[0], theta.device)


def _filter(x: torch.Tensor, h: torch.Tensor, dim: int, stride: int = 1) -> torch.Tensor:
    """Depthwise 1-D correlation with h along dim 2 (rows) or 3 (columns), no padding."""
    shape = (h.numel(), 1) if dim == 2 else (1, h.numel())
    weight = h.reshape(1, 1, *shape).expand(x.shape[1], 1, *shape)
    return F.conv2d(x, weight, groups=x.shape[1], stride=(stride, 1) if dim == 2 else (1, stride))


def _upsample2(x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Zero insertion + synthesis filter (upsampled pixel J ~ input coordinate J / 2, see `affine_resample`)."""
    k = h.numel()
    z = x.new_zeros(*x.shape[:3], 2 * x.shape[3])
    z[..., ::2] = x
    x = _filter(F.pad(z, [k // 2, k // 2 - 1, 0, 0]), h.flip(0), 3)
    z = x.new_zeros(*x.shape[:2], 2 * x.shape[2], x.shape[3])
    z[:, :, ::2] = x
    return _filter(F.pad(z, [0, 0, k // 2, k // 2 - 1]), h.flip(0), 2)


def _downsample2(x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Analysis filter + stride 2: the adjoint of `_upsample2` (their composition is the identity)."""
    k = h.numel()
    for dim in (3, 2):
        pad = [k // 2 - 1, k // 2 - 1, 0, 0] if dim == 3 else [0, 0, k // 2 - 1, k // 2 - 1]
        x = _filter(F.pad(x, pad), h, dim, stride=2)
    return x


def affine_resample(images: torch.Tensor, G_inv: torch.Tensor) -> torch.Tensor:
    """Output pixel at centred coordinate u takes the input at G_inv u ([n, 3, 3], pixel units, y down)."""
    n, C, H, W = images.shape
    dtype, device = images.dtype, images.device
    x = images.float()
    G_inv = G_inv.float().to(device)
    h = torch.tensor(SYM6, device=device)
    q = h.numel() // 4  # output border consumed by the downsampling filter
    # sym6 is not symmetric: its centroid lies `delay` upsampled pixels past tap k/2 - 1, so upsampled
    # pixel J shows input coordinate (J - delay) / 2. EDM takes delay = 0, a ~0.1-pixel skew under rotation.
    delay = float((torch.arange(h.numel()) * h.cpu()).sum() / h.sum()) - (h.numel() // 2 - 1)
    cx, cy = (W - 1) / 2, (H - 1) / 2

    # Reflect-pad far enough that the transformed output (plus filter support) stays inside the input.
    corners = torch.tensor([[-cx, -cy, 1], [cx, -cy, 1], [cx, cy, 1], [-cx, cy, 1]], device=device).T
    reach = (G_inv @ corners)[:, :2].permute(1, 0, 2).flatten(1)  # [xy, n * 4]
    margin = torch.cat([-reach, reach]).amax(1) + torch.tensor([2 * q - cx, 2 * q - cy] * 2, device=device)
    upper = torch.tensor([W - 1, H - 1] * 2, device=device, dtype=torch.float32)
    mx0, my0, mx1, my1 = margin.clamp(min=0).minimum(upper).ceil().int().tolist()
    x = _upsample2(F.pad(x, [mx0, mx1, my0, my1], mode="reflect"), h)

    # Sample a 2x-finer output lattice (with a q-pixel border) through G_inv, in upsampled input pixels.
    Ho, Wo = 2 * (H + 2 * q), 2 * (W + 2 * q)
    u = (torch.arange(Wo, device=device) - delay) / 2 - q - cx
    v = (torch.arange(Ho, device=device) - delay) / 2 - q - cy
    uv1 = torch.stack([u.expand(Ho, Wo), v[:, None].expand(Ho, Wo), torch.ones(Ho, Wo, device=device)], -1)
    src = torch.einsum("nij,hwj->nhwi", G_inv[:, :2], uv1)
    X = 2 * (src[..., 0] + cx + mx0) + delay
    Y = 2 * (src[..., 1] + cy + my0) + delay
    grid = torch.stack([(2 * X + 1) / x.shape[3] - 1, (2 * Y + 1) / x.shape[2] - 1], -1)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return _downsample2(x, h)[:, :, q:-q, q:-q].to(dtype)


class AugmentPipe:
    """ADA/EDM geometric augmentation: `(images) -> (augmented images, augment labels [N, augment_dim])`."""

    def __init__(self,
                 p: float = 0.12,                  # overall probability of each transform
                 xflip: float = 1e8,               # multipliers of p; 1e8 makes x-flip a fair coin on every image
                 yflip: float = 1,
                 scale: float = 1,                 # isotropic scale 2^(scale_std N(0,1))
                 rotate_frac: float = 1,           # rotation uniform in +-pi rotate_frac_max
                 aniso: float = 1,                 # anisotropic scale 2^(+-aniso_std N(0,1)) in a random frame
                 translate_frac: float = 1,        # translation translate_frac_std x size x N(0,1)
                 scale_std: float = 0.2,
                 rotate_frac_max: float = 1,
                 aniso_std: float = 0.2,
                 aniso_rotate_prob: float = 0.5,
                 translate_frac_std: float = 0.125) -> None:
        self.p = float(p)
        self.xflip, self.yflip, self.scale = float(xflip), float(yflip), float(scale)
        self.rotate_frac, self.aniso, self.translate_frac = float(rotate_frac), float(aniso), float(translate_frac)
        self.scale_std, self.rotate_frac_max = float(scale_std), float(rotate_frac_max)
        self.aniso_std, self.aniso_rotate_prob = float(aniso_std), float(aniso_rotate_prob)
        self.translate_frac_std = float(translate_frac_std)

    @property
    def augment_dim(self) -> int:
        """Length of the augment label: the network's `augment_dim`."""
        widths = [(self.xflip, 1), (self.yflip, 1), (self.scale, 1), (self.rotate_frac, 2), (self.aniso, 2),
                  (self.translate_frac, 2)]
        return sum(w for m, w in widths if m > 0)

    def __call__(self, images: torch.Tensor,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        N, _, H, W = images.shape
        device = images.device
        if self.p == 0:
            return images, torch.zeros(N, self.augment_dim, device=device)
        rand = lambda *shape: torch.rand(shape, generator=generator, device=device)
        randn = lambda *shape: torch.randn(shape, generator=generator, device=device)
        gate = lambda w, prob, *shape: torch.where(rand(*shape) < prob * self.p, w, torch.zeros_like(w))
        labels: list[torch.Tensor] = []

        # Pixel blitting: flips are exact and cheap.
        for multiplier, dim in ((self.xflip, 3), (self.yflip, 2)):
            if multiplier > 0:
                w = gate(torch.randint(2, (N, 1, 1, 1), generator=generator, device=device), multiplier, N, 1, 1, 1)
                images = torch.where(w == 1, images.flip(dim), images)
                labels.append(w)

        # General geometric transformations, composed as G_inv (output -> input coordinates).
        G_inv = torch.eye(3, device=device).expand(N, 3, 3)
        moved = torch.zeros(N, dtype=torch.bool, device=device)
        if self.scale > 0:
            w = gate(randn(N), self.scale, N)
            s = torch.exp2(w * self.scale_std)
            G_inv = G_inv @ scale2d(1 / s, 1 / s)
            labels.append(w)
            moved |= w != 0
        if self.rotate_frac > 0:
            w = gate((rand(N) * 2 - 1) * (math.pi * self.rotate_frac_max), self.rotate_frac, N)
            G_inv = G_inv @ rotate2d(w)
            labels += [w.cos() - 1, w.sin()]
            moved |= w != 0
        if self.aniso > 0:
            w, r = randn(N), (rand(N) * 2 - 1) * math.pi
            w = gate(w, self.aniso, N)
            r = torch.where(rand(N) < self.aniso_rotate_prob, r, torch.zeros_like(r))
            s = torch.exp2(w * self.aniso_std)
            G_inv = G_inv @ rotate2d(-r) @ scale2d(1 / s, s) @ rotate2d(r)
            labels += [w * r.cos(), w * r.sin()]
            moved |= w != 0
        if self.translate_frac > 0:
            w = gate(randn(2, N), self.translate_frac, 1, N)
            G_inv = G_inv @ translate2d(-w[0] * W * self.translate_frac_std, -w[1] * H * self.translate_frac_std)
            labels += [w[0], w[1]]
            moved |= (w != 0).any(0)

        # Resample only the images some transform moved; the rest stay bit-exact.
        if moved.any():
            images = images.clone()
            images[moved] = affine_resample(images[moved], G_inv[moved])
        return images, torch.cat([x.to(torch.float32).reshape(N, -1) for x in labels], 1)
