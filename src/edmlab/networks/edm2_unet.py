"""EDM2's magnitude-preserving U-Net (Karras et al. 2024, Sec. 2-3, Fig. 21; config G of Table 1).

Every convolution and linear layer is an `MPConv` (no biases, forced weight normalisation), activations
are `mp_silu`, residuals and skips are `mp_sum` / `mp_cat` with their balances, attention is cosine
attention (q, k pixel-normalised), the noise embedding is `MPFourier`, and the output has a learned,
zero-initialised gain. Module names equal NVlabs/edm2 `UNet`, so official weights load by name.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from edmlab.networks.layers import batch_noise_labels, class_label_input
from edmlab.networks.mp_layers import MPConv, MPFourier, mp_cat, mp_silu, mp_sum, normalize, resample

__all__ = ["EDM2UNet", "EDM2Block", "EDM2_PRESETS"]

# model_channels of NVlabs' presets (train_edm2.py: edm2-img512-* and edm2-img64-*).
EDM2_PRESETS: dict[str, int] = {"xxs": 64, "xs": 128, "s": 192, "m": 256, "l": 320, "xl": 384, "xxl": 448}


class EDM2Block(nn.Module):
    """Encoder ('enc') or decoder ('dec') block with optional cosine self-attention (Fig. 21)."""

    def __init__(self,
                 in_channels: int,                      # input channels
                 out_channels: int,                     # output channels
                 emb_channels: int,                     # embedding channels
                 flavor: str = "enc",                   # 'enc' (pixel norm on the main path) or 'dec'
                 resample_mode: str = "keep",           # 'keep', 'up' or 'down'
                 resample_filter: Sequence[float] = (1, 1),  # separable resampling filter
                 attention: bool = False,               # add self-attention after the residual branch
                 channels_per_head: int = 64,           # channels per attention head
                 dropout: float = 0.0,                  # dropout in the residual branch
                 res_balance: float = 0.3,              # main branch (0) vs residual branch (1)
                 attn_balance: float = 0.3,             # main branch (0) vs self-attention (1)
                 clip_act: float | None = 256,          # clip output activations; None = no clipping
                 ) -> None:
        super().__init__()
        if flavor not in ("enc", "dec"):
            raise ValueError(f"EDM2Block flavor must be 'enc' or 'dec', got {flavor!r}")
        self.out_channels = out_channels
        self.flavor = flavor
        self.resample_filter = list(resample_filter)
        self.resample_mode = resample_mode
        self.num_heads = out_channels // channels_per_head if attention else 0
        self.dropout = dropout
        self.res_balance = res_balance
        self.attn_balance = attn_balance
        self.clip_act = clip_act
        self.emb_gain = nn.Parameter(torch.zeros([]))
        self.conv_res0 = MPConv(out_channels if flavor == "enc" else in_channels, out_channels, kernel=[3, 3])
        self.emb_linear = MPConv(emb_channels, out_channels, kernel=[])
        self.conv_res1 = MPConv(out_channels, out_channels, kernel=[3, 3])
        self.conv_skip = MPConv(in_channels, out_channels, kernel=[1, 1]) if in_channels != out_channels else None
        self.attn_qkv = MPConv(out_channels, out_channels * 3, kernel=[1, 1]) if self.num_heads else None
        self.attn_proj = MPConv(out_channels, out_channels, kernel=[1, 1]) if self.num_heads else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        x = resample(x, f=self.resample_filter, mode=self.resample_mode)
        if self.flavor == "enc":
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = normalize(x, dim=1)  # pixel norm: the encoder's main path stays at unit magnitude

        y = self.conv_res0(mp_silu(x))
        c = self.emb_linear(emb, gain=self.emb_gain) + 1  # multiplicative conditioning, identity at init
        y = mp_silu(y * c[:, :, None, None].to(y.dtype))
        if self.training and self.dropout:
            y = F.dropout(y, p=self.dropout)
        y = self.conv_res1(y)

        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, t=self.res_balance)

        if self.num_heads:
            y = self.attn_qkv(x)
            y = y.reshape(y.shape[0], self.num_heads, -1, 3, y.shape[2] * y.shape[3])
            q, k, v = normalize(y, dim=2).unbind(3)  # cosine attention: q, k, v pixel-normalised per head
            w = torch.einsum("nhcq,nhck->nhqk", q, k / math.sqrt(q.shape[2])).softmax(dim=3)
            y = torch.einsum("nhqk,nhck->nhcq", w, v)
            x = mp_sum(x, self.attn_proj(y.reshape(*x.shape)), t=self.attn_balance)

        if self.clip_act is not None:
            x = x.clip(-self.clip_act, self.clip_act)
        return x


class EDM2UNet(nn.Module):
    """The EDM2 U-Net F(x; c_noise, class) (Fig. 21); `model_channels` picks the size (XS 128 ... XXL 448)."""

    def __init__(self,
                 img_resolution: int,                       # image (or latent) resolution
                 img_channels: int,                         # image (or latent) channels
                 label_dim: int = 0,                        # number of classes, 0 = unconditional
                 augment_dim: int = 0,                      # augmentation labels (an edmlab extension), 0 = none
                 model_channels: int = 192,                 # base channel count (preset size)
                 channel_mult: Sequence[int] = (1, 2, 3, 4),  # channel multiplier per resolution
                 channel_mult_noise: int | None = None,     # noise-embedding size / model_channels (None: mult[0])
                 channel_mult_emb: int | None = None,       # embedding size / model_channels (None: max(mult))
                 num_blocks: int = 3,                       # residual blocks per resolution
                 attn_resolutions: Sequence[int] = (16, 8),  # resolutions with self-attention
                 label_balance: float = 0.5,                # noise embedding (0) vs class embedding (1)
                 concat_balance: float = 0.5,               # skip connection (0) vs main path (1)
                 dropout: float = 0.0,                      # residual-branch dropout (0.10 for M and up)
                 label_dropout: float = 0.0,                # class-label dropout (classifier-free guidance)
                 res_balance: float = 0.3,                  # main branch vs residual branch in every block
                 attn_balance: float = 0.3,                 # main branch vs attention in every block
                 channels_per_head: int = 64,               # channels per attention head
                 clip_act: float | None = 256,              # clip block outputs; None = no clipping
                 ) -> None:
        super().__init__()
        self.img_resolution, self.img_channels = img_resolution, img_channels
        self.label_dim, self.augment_dim = label_dim, augment_dim
        self.out_channels = img_channels
        self.label_balance, self.concat_balance = label_balance, concat_balance
        self.label_dropout = label_dropout
        cblock = [model_channels * m for m in channel_mult]
        cnoise = model_channels * channel_mult_noise if channel_mult_noise is not None else cblock[0]
        cemb = model_channels * channel_mult_emb if channel_mult_emb is not None else max(cblock)
        block = dict(dropout=dropout, res_balance=res_balance, attn_balance=attn_balance,
                     channels_per_head=channels_per_head, clip_act=clip_act)
        self.out_gain = nn.Parameter(torch.zeros([]))

        # Embedding.
        self.emb_fourier = MPFourier(cnoise)
        self.emb_noise = MPConv(cnoise, cemb, kernel=[])
        self.emb_label = MPConv(label_dim, cemb, kernel=[]) if label_dim else None
        # Not in NVlabs' EDM2 (which trains without augmentation): EDM's augmentation labels enter the
        # embedding through a zero-initialised gain, so the network starts out ignoring them.
        self.emb_augment = MPConv(augment_dim, cemb, kernel=[]) if augment_dim else None
        self.augment_gain = nn.Parameter(torch.zeros([])) if augment_dim else None

        # Encoder; the input gets a constant-ones channel so the first conv can make a bias.
        self.enc = nn.ModuleDict()
        cout = img_channels + 1
        for level, channels in enumerate(cblock):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, channels
                self.enc[f"{res}x{res}_conv"] = MPConv(cin, cout, kernel=[3, 3])
            else:
                self.enc[f"{res}x{res}_down"] = EDM2Block(cout, cout, cemb, flavor="enc", resample_mode="down",
                                                          **block)
            for idx in range(num_blocks):
                cin, cout = cout, channels
                self.enc[f"{res}x{res}_block{idx}"] = EDM2Block(cin, cout, cemb, flavor="enc",
                                                                attention=res in attn_resolutions, **block)

        # Decoder.
        self.dec = nn.ModuleDict()
        skips = [b.out_channels for b in self.enc.values()]
        for level, channels in reversed(list(enumerate(cblock))):
            res = img_resolution >> level
            if level == len(cblock) - 1:
                self.dec[f"{res}x{res}_in0"] = EDM2Block(cout, cout, cemb, flavor="dec", attention=True, **block)
                self.dec[f"{res}x{res}_in1"] = EDM2Block(cout, cout, cemb, flavor="dec", **block)
            else:
                self.dec[f"{res}x{res}_up"] = EDM2Block(cout, cout, cemb, flavor="dec", resample_mode="up", **block)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), channels
                self.dec[f"{res}x{res}_block{idx}"] = EDM2Block(cin, cout, cemb, flavor="dec",
                                                                attention=res in attn_resolutions, **block)
        self.out_conv = MPConv(cout, img_channels, kernel=[3, 3])

    def embed(self, noise_labels: torch.Tensor, class_labels: torch.Tensor | None,
              augment_labels: torch.Tensor | None, batch: int) -> torch.Tensor:
        """mp_silu(mp_sum(W_noise Fourier(c_noise), W_label sqrt(N) onehot)) (Fig. 21, embedding)."""
        emb = self.emb_noise(self.emb_fourier(batch_noise_labels(noise_labels, batch)))
        if self.emb_label is not None:  # no labels: the zero label, as NVlabs (and what label dropout trains)
            labels = class_label_input(class_labels, self.label_dim, batch, torch.float32, emb.device,
                                       self.label_dropout, self.training)
            emb = mp_sum(emb, self.emb_label(labels * math.sqrt(labels.shape[1])).to(emb.dtype),
                         t=self.label_balance)
        if self.emb_augment is not None and augment_labels is not None:
            emb = emb + self.emb_augment(augment_labels.to(emb.dtype), gain=self.augment_gain)
        return mp_silu(emb)

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None = None,
                augment_labels: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.embed(noise_labels, class_labels, augment_labels, x.shape[0])
        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        skips = []
        for name, block in self.enc.items():
            x = block(x) if "conv" in name else block(x, emb)
            skips.append(x)
        for name, block in self.dec.items():
            if "block" in name:
                x = mp_cat(x, skips.pop(), t=self.concat_balance)
            x = block(x, emb)
        return self.out_conv(x, gain=self.out_gain)
