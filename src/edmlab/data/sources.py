"""Any image source by path: the one place that knows every on-disk image format edmlab reads."""

from __future__ import annotations

import os
from pathlib import Path

from edmlab.data.cifar10 import CIFAR10Dataset, is_cifar10_source
from edmlab.data.folder import ImageFolderDataset
from edmlab.data.images import ImageDataset, load_npz

__all__ = ["open_images"]


def open_images(path: str | os.PathLike) -> ImageDataset:
    """Any image source by path: folder, .zip, CIFAR-10 tarball or folder, or .npz; yields (uint8 CHW, label)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder (expected an image folder, .zip, .npz or "
                                f"cifar-10-python.tar.gz)")
    if path.suffix == ".npz":
        return load_npz(path)
    if is_cifar10_source(path):
        return CIFAR10Dataset(path, md5=None)
    return ImageFolderDataset(path)
