"""scikit-learn's bundled 8x8 handwritten digits (UCI optdigits test set) as a tiny real image dataset."""

from __future__ import annotations

import numpy as np
import PIL.Image

from edmlab.data.images import ArrayImageDataset


class DigitsDataset(ArrayImageDataset):
    """1797 grayscale digits, values 0..16 mapped to uint8 0..255, labels 0..9; no download needed."""

    def __init__(self, resolution: int = 8) -> None:  # side in pixels; != 8 resizes with Lanczos
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = np.rint(digits.images * (255 / 16)).astype(np.uint8)
        if resolution != 8:
            if resolution < 1:
                raise ValueError(f"resolution must be >= 1, got {resolution}")
            images = np.stack([np.asarray(PIL.Image.fromarray(im).resize((resolution, resolution),
                                                                          PIL.Image.LANCZOS)) for im in images])
        super().__init__(images[:, None], digits.target.astype(np.int64), label_dim=10, name="sklearn digits")
