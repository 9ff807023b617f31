"""Samples to 8-bit pixels, the one conversion every output (PNG, npz, grid, FID features) goes through."""

from __future__ import annotations

import torch

__all__ = ["to_uint8"]


def to_uint8(images: torch.Tensor, *, channels_last: bool = False) -> torch.Tensor:
    """[-1, 1] images [N, C, H, W] -> uint8 on their device, [N, H, W, C] if channels_last.

    EDM's rounding: clip(x * 127.5 + 128, 0, 255), then truncation (not round-to-nearest).
    """
    pixels = (images.float() * 127.5 + 128).clip(0, 255).to(torch.uint8)
    return pixels.permute(0, 2, 3, 1) if channels_last else pixels
