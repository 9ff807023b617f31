"""Layers shared by every edmlab network (the building blocks of EDM's U-Nets, Karras et al. 2022, App. F).

Module and parameter names follow NVlabs/edm `training/networks.py`, so official weights load by name.
Every layer casts its weights to the dtype of its input: a float32 network runs in bfloat16 when fed
bfloat16 (or under autocast) without a copy of the model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

__all__ = ["weight_init", "Linear", "Conv2d", "GroupNorm", "self_attention", "set_attention", "ATTENTION_BACKENDS",
           "UNetBlock", "PositionalEmbedding", "FourierEmbedding", "class_label_input", "batch_noise_labels"]


def weight_init(shape: Sequence[int], mode: str, fan_in: int, fan_out: int) -> torch.Tensor:
    """Xavier (Glorot & Bengio 2010) or Kaiming (He et al. 2015) initialisation, uniform or normal."""
    # Scaled in place: out-of-place arithmetic on the meta device (the checkpoint loader's shape probe) runs
    # Python meta kernels whose first call imports torch._dynamo (~1 s of sample.py's start-up).
    if mode == "xavier_uniform":
        return torch.rand(*shape).mul_(2).sub_(1).mul_(math.sqrt(6 / (fan_in + fan_out)))
    if mode == "xavier_normal":
        return torch.randn(*shape).mul_(math.sqrt(2 / (fan_in + fan_out)))
    if mode == "kaiming_uniform":
        return torch.rand(*shape).mul_(2).sub_(1).mul_(math.sqrt(3 / fan_in))
    if mode == "kaiming_normal":
        return torch.randn(*shape).mul_(math.sqrt(1 / fan_in))
    raise ValueError(f"invalid init_mode {mode!r}; expected xavier_uniform, xavier_normal, "
                     "kaiming_uniform or kaiming_normal")


class Linear(nn.Module):
    """Fully-connected layer with EDM's init modes (weight scaled by init_weight, bias by init_bias)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 init_mode: str = "kaiming_normal", init_weight: float = 1.0, init_bias: float = 0.0) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        fans = dict(mode=init_mode, fan_in=in_features, fan_out=out_features)
        self.weight = nn.Parameter(weight_init([out_features, in_features], **fans).mul_(init_weight))
        self.bias = nn.Parameter(weight_init([out_features], **fans).mul_(init_bias)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, self.weight.to(x.dtype), bias)


class Conv2d(nn.Module):
    """Convolution with optional FIR up/downsampling by 2 (kernel=0: resampling only).

    The filter `resample_filter` ([1,1] box, or [1,3,3,1] as in NCSN++/StyleGAN) is applied separably;
    `fused_resample` folds the resampling into the convolution's stride/padding (NCSN++ residual encoder).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, bias: bool = True, up: bool = False,
                 down: bool = False, resample_filter: Sequence[int] = (1, 1), fused_resample: bool = False,
                 init_mode: str = "kaiming_normal", init_weight: float = 1.0, init_bias: float = 0.0) -> None:
        if up and down:
            raise ValueError("Conv2d: up and down are mutually exclusive")
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.up, self.down, self.fused_resample = up, down, fused_resample
        fans = dict(mode=init_mode, fan_in=in_channels * kernel**2, fan_out=out_channels * kernel**2)
        w = weight_init([out_channels, in_channels, kernel, kernel], **fans).mul_(init_weight) if kernel else None
        self.weight = nn.Parameter(w) if kernel else None
        self.bias = nn.Parameter(weight_init([out_channels], **fans).mul_(init_bias)) if kernel and bias else None
        taps = [float(t) for t in resample_filter]  # outer(f, f) / sum(f)^2 in Python: no meta kernel in the probe
        norm = sum(taps) ** 2
        f = [[[[u * v / norm for v in taps] for u in taps]]]
        self.register_buffer("resample_filter", torch.tensor(f, dtype=torch.float32) if up or down else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(x.dtype) if self.weight is not None else None
        f = self.resample_filter.to(x.dtype) if self.resample_filter is not None else None
        w_pad = w.shape[-1] // 2 if w is not None else 0
        f_pad = (f.shape[-1] - 1) // 2 if f is not None else 0
        if self.fused_resample and self.up and w is not None:
            x = F.conv_transpose2d(x, f.mul(4).tile([self.in_channels, 1, 1, 1]), groups=self.in_channels,
                                   stride=2, padding=w_pad + f_pad)
            x = F.conv2d(x, w)
        elif self.fused_resample and self.down and w is not None:
            x = F.conv2d(x, w, padding=w_pad + f_pad)
            x = F.conv2d(x, f.tile([self.out_channels, 1, 1, 1]), groups=self.out_channels, stride=2)
        else:
            if self.up:
                x = F.conv_transpose2d(x, f.mul(4).tile([self.in_channels, 1, 1, 1]), groups=self.in_channels,
                                       stride=2, padding=f_pad)
            if self.down:
                x = F.conv2d(x, f.tile([self.in_channels, 1, 1, 1]), groups=self.in_channels, stride=2,
                             padding=f_pad)
            if w is not None:
                x = F.conv2d(x, w, padding=w_pad)
        if self.bias is not None:
            # Cast to the convolution's output dtype, which autocast may have lowered.
            x = x + self.bias.to(x.dtype).reshape(1, -1, 1, 1)
        return x


class GroupNorm(nn.Module):
    """Group normalisation (Wu & He 2018) with at most 32 groups and at least 4 channels per group."""

    def __init__(self, num_channels: int, num_groups: int = 32, min_channels_per_group: int = 4,
                 eps: float = 1e-5) -> None:
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


ATTENTION_BACKENDS = ("einsum", "sdpa")
_attention = {"backend": "einsum"}


def set_attention(backend: str) -> None:
    """Every U-Net's self-attention from now on: "einsum" (EDM's ops) or "sdpa" (fused, same result)."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend {backend!r}: use one of {', '.join(ATTENTION_BACKENDS)}")
    _attention["backend"] = backend


def self_attention(qkv: torch.Tensor, num_heads: int, backend: str | None = None) -> torch.Tensor:
    """Multi-head dot-product self-attention over pixels, softmax(q^T k / sqrt(c)) v (Vaswani et al. 2017).

    `qkv` is [N, 3C, H, W] with EDM's channel layout (head, channel, q/k/v); returns [N, C, H, W].
    `backend` (default: `set_attention`'s): "einsum" or "sdpa", torch's fused scaled_dot_product_attention,
    which accumulates the logits and the softmax in float32 itself and never stores the [HW, HW] weights.
    """
    backend = backend or _attention["backend"]
    if backend == "sdpa":
        q, k, v = rearrange(qkv, "n (h c three) y x -> three n h (y x) c", h=num_heads, three=3)
        a = F.scaled_dot_product_attention(q, k, v)
        return rearrange(a, "n h (y x) c -> n (h c) y x", y=qkv.shape[2])
    q, k, v = rearrange(qkv, "n (h c three) y x -> three (n h) c (y x)", h=num_heads, three=3)
    # Logits and softmax in at least float32 whatever the activation dtype: bf16/fp16 logits overflow or
    # lose the small attention weights (EDM's AttentionOp does the same).
    dtype = torch.promote_types(q.dtype, torch.float32)
    with torch.autocast(qkv.device.type, enabled=False):
        logits = torch.einsum("ncq,nck->nqk", q.to(dtype), k.to(dtype) / math.sqrt(k.shape[1]))
        w = logits.softmax(dim=2).to(v.dtype)
    a = torch.einsum("nqk,nck->ncq", w, v)
    return rearrange(a, "(n h) c (y x) -> n (h c) y x", h=num_heads, y=qkv.shape[2])


class UNetBlock(nn.Module):
    """Residual block with noise-embedding modulation, optional resampling and self-attention.

    The union of the DDPM++/NCSN++ (Song et al. 2021) and ADM (Dhariwal & Nichol 2021) blocks as
    parametrised in EDM: `adaptive_scale` gives ADM's scale-and-shift, else the embedding is added.
    """

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int,
                 up: bool = False,                          # upsample by 2 before conv0 (and on the skip)
                 down: bool = False,                        # downsample by 2
                 attention: bool = False,                   # self-attention after the residual branch
                 num_heads: int | None = None,              # attention heads; None: out_channels // channels_per_head
                 channels_per_head: int = 64,
                 dropout: float = 0.0,
                 skip_scale: float = 1.0,                   # output multiplier (sqrt(1/2) in Song's U-Net)
                 eps: float = 1e-5,                         # GroupNorm epsilon
                 resample_filter: Sequence[int] = (1, 1),
                 resample_proj: bool = False,               # 1x1 conv on a resampled skip even if C is unchanged
                 adaptive_scale: bool = True,
                 init: dict | None = None,                  # Conv2d/Linear init kwargs
                 init_zero: dict | None = None,             # init of the last conv of each branch
                 init_attn: dict | None = None) -> None:
        super().__init__()
        init = dict(init or {})
        init_zero = dict(init_weight=0) if init_zero is None else dict(init_zero)
        init_attn = init if init_attn is None else dict(init_attn)
        self.in_channels, self.out_channels, self.emb_channels = in_channels, out_channels, emb_channels
        if attention:
            self.num_heads = num_heads if num_heads is not None else out_channels // channels_per_head
        else:
            self.num_heads = 0
        self.dropout, self.skip_scale, self.adaptive_scale = dropout, skip_scale, adaptive_scale

        self.norm0 = GroupNorm(in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, kernel=3, up=up, down=down,
                            resample_filter=resample_filter, **init)
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1), **init)
        self.norm1 = GroupNorm(out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, kernel=3, **init_zero)
        self.skip = None
        if out_channels != in_channels or up or down:
            kernel = 1 if resample_proj or out_channels != in_channels else 0
            self.skip = Conv2d(in_channels, out_channels, kernel=kernel, up=up, down=down,
                               resample_filter=resample_filter, **init)
        if self.num_heads:
            self.norm2 = GroupNorm(out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, kernel=1, **init_attn)
            self.proj = Conv2d(out_channels, out_channels, kernel=1, **init_zero)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        orig = x
        x = self.conv0(F.silu(self.norm0(x)))
        params = self.affine(emb)[:, :, None, None].to(x.dtype)
        if self.adaptive_scale:
            scale, shift = params.chunk(2, dim=1)
            x = F.silu(torch.addcmul(shift, self.norm1(x), scale + 1))
        else:
            x = F.silu(self.norm1(x + params))
        x = self.conv1(F.dropout(x, p=self.dropout, training=self.training))
        x = (x + (self.skip(orig) if self.skip is not None else orig)) * self.skip_scale
        if self.num_heads:
            a = self_attention(self.qkv(self.norm2(x)), self.num_heads)
            x = (self.proj(a.to(x.dtype)) + x) * self.skip_scale
        return x


class PositionalEmbedding(nn.Module):
    """Sinusoidal embedding [cos(x w_i), sin(x w_i)], w_i = max_positions^(-i/n) (Vaswani et al. 2017)."""

    def __init__(self, num_channels: int, max_positions: int = 10000, endpoint: bool = False) -> None:
        super().__init__()
        self.num_channels, self.max_positions, self.endpoint = num_channels, max_positions, endpoint

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = self.num_channels // 2
        freqs = torch.arange(half, dtype=torch.float32, device=x.device) / (half - (1 if self.endpoint else 0))
        freqs = (1 / self.max_positions) ** freqs
        x = torch.outer(x, freqs.to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


class FourierEmbedding(nn.Module):
    """Random Fourier features [cos(2 pi x f_i), sin(2 pi x f_i)], f_i ~ N(0, scale^2) (Tancik et al. 2020)."""

    def __init__(self, num_channels: int, scale: float = 16) -> None:
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_channels // 2).mul_(scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.outer(x, (2 * math.pi * self.freqs).to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


def class_label_input(class_labels: torch.Tensor | None, label_dim: int, batch: int, dtype: torch.dtype,
                      device: torch.device, label_dropout: float = 0.0, training: bool = False) -> torch.Tensor:
    """Class labels as [N, label_dim] one-hot rows (zeros = no class, as EDM's preconditioning feeds).

    Integer labels of shape [N] are one-hot encoded; `label_dropout` zeroes whole rows while training
    (classifier-free guidance, Ho & Salimans 2022).
    """
    if class_labels is None:
        labels = torch.zeros(batch, label_dim, dtype=dtype, device=device)
    elif not class_labels.is_floating_point():
        if class_labels.ndim != 1:
            raise ValueError(f"integer class labels must have shape [N]; got {tuple(class_labels.shape)}")
        labels = F.one_hot(class_labels.long(), label_dim).to(dtype)
    else:
        if class_labels.shape[-1] != label_dim:
            raise ValueError(f"class labels have {class_labels.shape[-1]} columns but the network was built "
                             f"with label_dim={label_dim}")
        labels = class_labels.to(dtype).reshape(-1, label_dim)
    if training and label_dropout:
        keep = torch.rand(labels.shape[0], 1, device=labels.device) >= label_dropout
        labels = labels * keep.to(labels.dtype)
    return labels


def batch_noise_labels(noise_labels: torch.Tensor, batch: int) -> torch.Tensor:
    """c_noise as one value per batch item ([N]); a single value is shared by the whole batch."""
    noise_labels = torch.as_tensor(noise_labels).reshape(-1)
    return noise_labels.expand(batch) if noise_labels.numel() == 1 else noise_labels
