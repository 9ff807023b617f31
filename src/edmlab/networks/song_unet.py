"""Song et al.'s U-Net (ICLR 2021, "Score-Based Generative Modeling through SDEs") as DDPM++ and NCSN++.

Re-implemented from the paper and EDM's description (Karras et al. 2022, App. F.2); module names
match NVlabs/edm `SongUNet` so official weights load by name.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from edmlab.networks.layers import (
    Conv2d,
    FourierEmbedding,
    GroupNorm,
    Linear,
    PositionalEmbedding,
    UNetBlock,
    batch_noise_labels,
    class_label_input,
)

__all__ = ["SongUNet"]


class SongUNet(nn.Module):
    """DDPM++ (positional embedding, standard encoder) / NCSN++ (Fourier embedding, residual encoder, FIR)."""

    def __init__(self,
                 img_resolution: int,                       # image resolution at input and output
                 img_channels: int,                         # colour channels at input
                 label_dim: int = 0,                        # number of classes, 0 = unconditional
                 augment_dim: int = 0,                      # augmentation-label dimension, 0 = none
                 out_channels: int | None = None,           # output channels (None: img_channels)
                 model_channels: int = 128,                 # base channel count
                 channel_mult: Sequence[int] = (1, 2, 2, 2),  # channel multiplier per resolution
                 channel_mult_emb: int = 4,                 # embedding size = model_channels * this
                 num_blocks: int = 4,                       # residual blocks per resolution
                 attn_resolutions: Sequence[int] = (16,),   # resolutions with self-attention
                 dropout: float = 0.10,                     # dropout inside the residual blocks
                 label_dropout: float = 0.0,                # class-label dropout (classifier-free guidance)
                 embedding_type: str = "positional",        # "positional" (DDPM++) or "fourier" (NCSN++)
                 channel_mult_noise: int = 1,               # noise-embedding size: 1 (DDPM++), 2 (NCSN++)
                 encoder_type: str = "standard",            # "standard", "skip" or "residual" (NCSN++)
                 decoder_type: str = "standard",            # "standard" or "skip"
                 resample_filter: Sequence[int] = (1, 1),   # [1,1] (DDPM++) or [1,3,3,1] (NCSN++)
                 ) -> None:
        for key, value, valid in (("embedding_type", embedding_type, ("positional", "fourier")),
                                  ("encoder_type", encoder_type, ("standard", "skip", "residual")),
                                  ("decoder_type", decoder_type, ("standard", "skip"))):
            if value not in valid:
                raise ValueError(f"SongUNet: {key}={value!r} is not one of {valid}")
        super().__init__()
        self.img_resolution, self.img_channels = img_resolution, img_channels
        self.label_dim, self.augment_dim = label_dim, augment_dim
        self.out_channels = img_channels if out_channels is None else out_channels
        self.label_dropout = label_dropout
        self.levels, self.num_blocks = len(channel_mult), num_blocks
        self.encoder_type, self.decoder_type = encoder_type, decoder_type
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        init = dict(init_mode="xavier_uniform")
        init_zero = dict(init_mode="xavier_uniform", init_weight=1e-5)
        init_attn = dict(init_mode="xavier_uniform", init_weight=math.sqrt(0.2))
        block = dict(emb_channels=emb_channels, num_heads=1, dropout=dropout, skip_scale=math.sqrt(0.5), eps=1e-6,
                     resample_filter=resample_filter, resample_proj=True, adaptive_scale=False,
                     init=init, init_zero=init_zero, init_attn=init_attn)

        # Mapping network: noise (+ class + augmentation) embedding -> emb.
        if embedding_type == "positional":
            self.map_noise = PositionalEmbedding(noise_channels, endpoint=True)
        else:
            self.map_noise = FourierEmbedding(noise_channels)
        self.map_label = Linear(label_dim, noise_channels, **init) if label_dim else None
        self.map_augment = Linear(augment_dim, noise_channels, bias=False, **init) if augment_dim else None
        self.map_layer0 = Linear(noise_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)

        # Encoder; `skips` tracks the channels each decoder block will concatenate.
        self.enc = nn.ModuleDict()
        cout = caux = img_channels
        skips = []
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cout = model_channels
                self.enc[f"{res}x{res}_conv"] = Conv2d(img_channels, cout, kernel=3, **init)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block)
                if encoder_type == "skip":
                    self.enc[f"{res}x{res}_aux_down"] = Conv2d(caux, caux, kernel=0, down=True,
                                                               resample_filter=resample_filter)
                    self.enc[f"{res}x{res}_aux_skip"] = Conv2d(caux, cout, kernel=1, **init)
                if encoder_type == "residual":
                    self.enc[f"{res}x{res}_aux_residual"] = Conv2d(caux, cout, kernel=3, down=True,
                                                                   resample_filter=resample_filter,
                                                                   fused_resample=True, **init)
                    caux = cout
            skips.append(cout)
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=res in attn_resolutions,
                                                                **block)
                skips.append(cout)

        # Decoder.
        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                attn = idx == num_blocks and res in attn_resolutions
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=attn, **block)
            if decoder_type == "skip" or level == 0:
                if decoder_type == "skip" and level < len(channel_mult) - 1:
                    self.dec[f"{res}x{res}_aux_up"] = Conv2d(self.out_channels, self.out_channels, kernel=0,
                                                             up=True, resample_filter=resample_filter)
                self.dec[f"{res}x{res}_aux_norm"] = GroupNorm(cout, eps=1e-6)
                self.dec[f"{res}x{res}_aux_conv"] = Conv2d(cout, self.out_channels, kernel=3, **init_zero)

    def embed(self, noise_labels: torch.Tensor, class_labels: torch.Tensor | None,
              augment_labels: torch.Tensor | None) -> torch.Tensor:
        """The conditioning vector: noise embedding (sin first, as Song's code) + label terms, then 2 layers."""
        emb = self.map_noise(noise_labels)
        emb = rearrange(rearrange(emb, "n (two c) -> n two c", two=2).flip(1), "n two c -> n (two c)")
        if self.map_label is not None:
            labels = class_label_input(class_labels, self.label_dim, emb.shape[0], emb.dtype, emb.device,
                                       self.label_dropout, self.training)
            # sqrt(label_dim) keeps a one-hot input at unit norm per column, like the init assumes.
            emb = emb + self.map_label(labels * math.sqrt(self.label_dim))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels.to(emb.dtype))
        emb = F.silu(self.map_layer0(emb))
        return F.silu(self.map_layer1(emb))

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None = None,
                augment_labels: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.embed(batch_noise_labels(noise_labels, x.shape[0]), class_labels, augment_labels)
        enc, dec = self.enc, self.dec

        skips, aux = [], x
        for level in range(self.levels):
            res = self.img_resolution >> level
            if level == 0:
                x = enc[f"{res}x{res}_conv"](x)
            else:
                x = enc[f"{res}x{res}_down"](x, emb)
                if self.encoder_type == "skip":
                    aux = enc[f"{res}x{res}_aux_down"](aux)
                    x = x + enc[f"{res}x{res}_aux_skip"](aux)
                elif self.encoder_type == "residual":
                    x = aux = (x + enc[f"{res}x{res}_aux_residual"](aux)) / math.sqrt(2)
            skips.append(x)
            for idx in range(self.num_blocks):
                x = enc[f"{res}x{res}_block{idx}"](x, emb)
                skips.append(x)

        out = None
        for level in reversed(range(self.levels)):
            res = self.img_resolution >> level
            if level == self.levels - 1:
                x = dec[f"{res}x{res}_in1"](dec[f"{res}x{res}_in0"](x, emb), emb)
            else:
                x = dec[f"{res}x{res}_up"](x, emb)
            for idx in range(self.num_blocks + 1):
                x = dec[f"{res}x{res}_block{idx}"](torch.cat([x, skips.pop().to(x.dtype)], dim=1), emb)
            if f"{res}x{res}_aux_norm" in dec:
                if out is not None:
                    out = dec[f"{res}x{res}_aux_up"](out)
                y = dec[f"{res}x{res}_aux_conv"](F.silu(dec[f"{res}x{res}_aux_norm"](x)))
                out = y if out is None else y + out
        return out
