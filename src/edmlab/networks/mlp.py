"""A residual MLP network F(x; c_noise) for low-dimensional data (toy 2-D sets, tiny images flattened)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from edmlab.networks.layers import FourierEmbedding, Linear, PositionalEmbedding, batch_noise_labels, class_label_input

__all__ = ["MLP"]


class MLPBlock(nn.Module):
    """Pre-norm residual block h + W2 dropout(silu(W1 norm(h) + A emb)); W2 starts near zero."""

    def __init__(self, channels: int, emb_channels: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels)
        self.linear0 = Linear(channels, channels, init_mode="xavier_uniform")
        self.affine = Linear(emb_channels, channels, init_mode="xavier_uniform")
        self.linear1 = Linear(channels, channels, init_mode="xavier_uniform", init_weight=1e-5)
        self.dropout = dropout

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        y = F.silu(self.linear0(self.norm(h)) + self.affine(emb).to(h.dtype))
        return h + self.linear1(F.dropout(y, p=self.dropout, training=self.training))


class MLP(nn.Module):
    """Residual MLP denoiser network for x of shape [N, d] (img_resolution=1, img_channels=d) or small images.

    Any input [N, C, H, W] with C * H * W = img_channels * img_resolution^2 is flattened; the output has
    `out_channels` in place of C. Conditioning follows DDPM++: noise embedding + class/augment embeddings.
    """

    def __init__(self,
                 img_resolution: int,                       # 1 for vectors x in R^d
                 img_channels: int,                         # d for vectors
                 label_dim: int = 0,                        # number of classes, 0 = unconditional
                 augment_dim: int = 0,                      # augmentation-label dimension, 0 = none
                 out_channels: int | None = None,           # output channels (None: img_channels)
                 hidden_channels: int = 256,                # width of the residual stream
                 num_blocks: int = 4,                       # residual blocks
                 emb_channels: int = 128,                   # conditioning-vector size
                 embedding_type: str = "positional",        # "positional" or "fourier" noise embedding
                 dropout: float = 0.0,
                 label_dropout: float = 0.0,                # class-label dropout (classifier-free guidance)
                 ) -> None:
        if embedding_type not in ("positional", "fourier"):
            raise ValueError(f"MLP: embedding_type={embedding_type!r} is not one of ('positional', 'fourier')")
        super().__init__()
        self.img_resolution, self.img_channels = img_resolution, img_channels
        self.label_dim, self.augment_dim = label_dim, augment_dim
        self.out_channels = img_channels if out_channels is None else out_channels
        self.label_dropout = label_dropout
        self.in_features = img_channels * img_resolution**2
        init = dict(init_mode="xavier_uniform")

        if embedding_type == "positional":
            self.map_noise = PositionalEmbedding(emb_channels, endpoint=True)
        else:
            self.map_noise = FourierEmbedding(emb_channels)
        self.map_label = Linear(label_dim, emb_channels, **init) if label_dim else None
        self.map_augment = Linear(augment_dim, emb_channels, bias=False, **init) if augment_dim else None
        self.map_layer0 = Linear(emb_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)

        self.input = Linear(self.in_features, hidden_channels, **init)
        self.blocks = nn.ModuleList(MLPBlock(hidden_channels, emb_channels, dropout) for _ in range(num_blocks))
        self.out_norm = nn.LayerNorm(hidden_channels)
        self.output = Linear(hidden_channels, self.out_channels * img_resolution**2, init_mode="xavier_uniform",
                             init_weight=1e-5)

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None = None,
                augment_labels: torch.Tensor | None = None) -> torch.Tensor:
        n = x.shape[0]
        if math.prod(x.shape[1:]) != self.in_features:
            raise ValueError(f"MLP built for {self.in_features} input features (img_channels="
                             f"{self.img_channels}, img_resolution={self.img_resolution}); got x of shape "
                             f"{tuple(x.shape)}")
        emb = self.map_noise(batch_noise_labels(noise_labels, n))
        if self.map_label is not None:
            labels = class_label_input(class_labels, self.label_dim, n, emb.dtype, emb.device,
                                       self.label_dropout, self.training)
            emb = emb + self.map_label(labels * math.sqrt(self.label_dim))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels.to(emb.dtype))
        emb = F.silu(self.map_layer1(F.silu(self.map_layer0(emb))))

        h = self.input(x.reshape(n, -1))
        for block in self.blocks:
            h = block(h, emb)
        out = self.output(F.silu(self.out_norm(h)))
        return out.reshape(n, self.out_channels, *x.shape[2:])
