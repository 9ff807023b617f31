"""ADM U-Net of Dhariwal & Nichol (NeurIPS 2021, "Diffusion Models Beat GANs on Image Synthesis").

Re-implemented as EDM parametrises it (Karras et al. 2022, App. F.3); module names match NVlabs/edm
`DhariwalUNet` so official weights load by name.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from edmlab.networks.layers import (
    Conv2d,
    GroupNorm,
    Linear,
    PositionalEmbedding,
    UNetBlock,
    batch_noise_labels,
    class_label_input,
)

__all__ = ["DhariwalUNet"]


class DhariwalUNet(nn.Module):
    """ADM: scale-and-shift residual blocks, multi-head attention (64 channels/head), learned class embedding."""

    def __init__(self,
                 img_resolution: int,                       # image resolution at input and output
                 img_channels: int,                         # colour channels at input
                 label_dim: int = 0,                        # number of classes, 0 = unconditional
                 augment_dim: int = 0,                      # augmentation-label dimension, 0 = none
                 out_channels: int | None = None,           # output channels (None: img_channels; 2x for iDDPM)
                 model_channels: int = 192,                 # base channel count
                 channel_mult: Sequence[int] = (1, 2, 3, 4),  # channel multiplier per resolution
                 channel_mult_emb: int = 4,                 # embedding size = model_channels * this
                 num_blocks: int = 3,                       # residual blocks per resolution
                 attn_resolutions: Sequence[int] = (32, 16, 8),  # resolutions with self-attention
                 dropout: float = 0.10,                     # dropout inside the residual blocks
                 label_dropout: float = 0.0,                # class-label dropout (classifier-free guidance)
                 ) -> None:
        super().__init__()
        self.img_resolution, self.img_channels = img_resolution, img_channels
        self.label_dim, self.augment_dim = label_dim, augment_dim
        self.out_channels = img_channels if out_channels is None else out_channels
        self.label_dropout = label_dropout
        self.levels, self.num_blocks = len(channel_mult), num_blocks
        emb_channels = model_channels * channel_mult_emb
        init = dict(init_mode="kaiming_uniform", init_weight=math.sqrt(1 / 3), init_bias=math.sqrt(1 / 3))
        init_zero = dict(init_mode="kaiming_uniform", init_weight=0, init_bias=0)
        block = dict(emb_channels=emb_channels, channels_per_head=64, dropout=dropout, init=init,
                     init_zero=init_zero)

        # Mapping network.
        self.map_noise = PositionalEmbedding(model_channels)
        self.map_augment = Linear(augment_dim, model_channels, bias=False, **init_zero) if augment_dim else None
        self.map_layer0 = Linear(model_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)
        self.map_label = (Linear(label_dim, emb_channels, bias=False, init_mode="kaiming_normal",
                                 init_weight=math.sqrt(label_dim)) if label_dim else None)

        # Encoder; every encoder output is a skip connection.
        self.enc = nn.ModuleDict()
        cout = img_channels
        skips = []
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cout = model_channels * mult
                self.enc[f"{res}x{res}_conv"] = Conv2d(img_channels, cout, kernel=3, **init)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block)
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
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=res in attn_resolutions,
                                                                **block)
        self.out_norm = GroupNorm(cout)
        self.out_conv = Conv2d(cout, self.out_channels, kernel=3, **init_zero)

    def embed(self, noise_labels: torch.Tensor, class_labels: torch.Tensor | None,
              augment_labels: torch.Tensor | None) -> torch.Tensor:
        """The conditioning vector; ADM adds the class embedding after the noise MLP."""
        emb = self.map_noise(noise_labels)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels.to(emb.dtype))
        emb = self.map_layer1(F.silu(self.map_layer0(emb)))
        if self.map_label is not None:
            labels = class_label_input(class_labels, self.label_dim, emb.shape[0], emb.dtype, emb.device,
                                       self.label_dropout, self.training)
            emb = emb + self.map_label(labels)
        return F.silu(emb)

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None = None,
                augment_labels: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.embed(batch_noise_labels(noise_labels, x.shape[0]), class_labels, augment_labels)
        skips = []
        for block in self.enc.values():
            x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
            skips.append(x)
        for name, block in self.dec.items():
            if "_block" in name:  # decoder blocks concatenate the matching encoder output
                x = torch.cat([x, skips.pop().to(x.dtype)], dim=1)
            x = block(x, emb)
        return self.out_conv(F.silu(self.out_norm(x)))
