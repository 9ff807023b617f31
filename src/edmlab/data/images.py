"""Image datasets in EDM's convention: uint8 CHW images and optional labels (EDM `training/dataset.py`).

Every image dataset here yields `(image, label)` with `image` a uint8 tensor [C, H, W] and `label` a
float32 tensor [label_dim]: one-hot for integer class labels, the stored vector for float labels, and
zero-width ([0]) for unlabeled data. `raw_labels` keeps the labels as stored (int64 [N], float32 [N, D]
or None).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset


def check_labels(raw_labels: np.ndarray | None, n: int, source: str) -> np.ndarray | None:
    """Validate raw labels against n images: int64 [n] class indices >= 0 or float32 [n, D] vectors."""
    if raw_labels is None:
        return None
    raw_labels = np.asarray(raw_labels)
    if raw_labels.shape[:1] != (n,):
        raise ValueError(f"{source}: {raw_labels.shape[0] if raw_labels.ndim else 0} labels for {n} images")
    if raw_labels.ndim == 1 and np.issubdtype(raw_labels.dtype, np.integer):
        if n and raw_labels.min() < 0:
            raise ValueError(f"{source}: class labels must be >= 0, found {int(raw_labels.min())}")
        return raw_labels.astype(np.int64)
    if raw_labels.ndim == 2 and np.issubdtype(raw_labels.dtype, np.number):
        return raw_labels.astype(np.float32)
    raise ValueError(f"{source}: labels must be integers [N] or float vectors [N, D]; got dtype "
                     f"{raw_labels.dtype} shape {raw_labels.shape}")


def square_side(image_shape, source: str) -> int:
    """H of a [C, H, W] shape, refusing non-square images (the U-Nets need H == W)."""
    _, h, w = image_shape
    if h != w:
        raise ValueError(f"{source}: images are {h}x{w}, not square; the U-Nets need square images")
    return h


class ImageDataset(Dataset):
    """Base class: subclasses provide `__len__`, `load_image(i) -> uint8 [C,H,W]`, `image_shape`, `raw_labels`."""

    image_shape: tuple[int, int, int]
    raw_labels: np.ndarray | None = None
    name: str = "images"

    def __init__(self, label_dim: int | None = None) -> None:
        self._label_dim = label_dim

    def load_image(self, index: int) -> np.ndarray:
        raise NotImplementedError

    @property
    def num_channels(self) -> int:
        return self.image_shape[0]

    @property
    def resolution(self) -> int:
        """Side of the (square) images; EDM's networks need H == W."""
        return square_side(self.image_shape, self.name)

    @property
    def has_labels(self) -> bool:
        return self.raw_labels is not None

    @property
    def label_dim(self) -> int:
        """Width of the label vector: max class + 1 (or as given), the vector length, or 0 when unlabeled."""
        if self.raw_labels is None:
            return 0
        if self.raw_labels.ndim == 2:
            return self.raw_labels.shape[1]
        if self._label_dim is not None:
            return self._label_dim
        return int(self.raw_labels.max()) + 1 if len(self.raw_labels) else 0

    def get_label(self, index: int) -> torch.Tensor:
        """float32 [label_dim]: one-hot class, stored vector, or zero-width."""
        if self.raw_labels is None:
            return torch.zeros(0)
        if self.raw_labels.ndim == 2:
            return torch.from_numpy(self.raw_labels[index].copy())
        onehot = torch.zeros(self.label_dim)
        onehot[int(self.raw_labels[index])] = 1
        return onehot

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(np.array(self.load_image(index), copy=True)), self.get_label(index)


class ArrayImageDataset(ImageDataset):
    """Images held in memory as one uint8 array [N, C, H, W]."""

    def __init__(self, images: np.ndarray, raw_labels: np.ndarray | None = None, label_dim: int | None = None,
                 name: str = "images") -> None:
        super().__init__(label_dim)
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(f"{name}: images must be uint8 [N, C, H, W]; got {images.dtype} {images.shape}")
        self.images = images
        self.image_shape = tuple(images.shape[1:])
        self.raw_labels = check_labels(raw_labels, len(images), name)
        self.name = name
        if self.raw_labels is not None and self.raw_labels.ndim == 1 and label_dim is not None and len(images):
            if self.raw_labels.max() >= label_dim:
                raise ValueError(f"{name}: class {int(self.raw_labels.max())} >= label_dim {label_dim}")

    def __len__(self) -> int:
        return len(self.images)

    def load_image(self, index: int) -> np.ndarray:
        return self.images[index]


def load_npz(path: str | os.PathLike) -> ArrayImageDataset:
    """An .npz with `images` uint8 [N, H, W, C] (or [N, H, W]) and optional `labels`."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as f:
            if "images" not in f:
                raise ValueError(f"{path}: no 'images' array (found {sorted(f.files)}); expected uint8 [N, H, W, C]")
            images, labels = f["images"], (f["labels"] if "labels" in f else None)
    except (OSError, EOFError) as e:
        raise ValueError(f"{path}: not a readable .npz file ({e})") from e
    if images.ndim == 3:
        images = images[..., None]
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"{path}: 'images' must be uint8 [N, H, W, C]; got {images.dtype} {images.shape}")
    return ArrayImageDataset(images.transpose(0, 3, 1, 2), labels, name=str(path))
