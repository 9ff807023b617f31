"""Datasets, EDM augmentation and LightningDataModules (batch format: see `edmlab.data.datamodule`)."""

from edmlab.data.augment import AugmentPipe
from edmlab.data.cifar10 import CIFAR10Dataset, download_cifar10
from edmlab.data.datamodule import (
    ImageDataModule,
    InfiniteDataModule,
    VectorDataModule,
    XFlipDataset,
    per_device_batch,
    split_batch,
)
from edmlab.data.digits import DigitsDataset
from edmlab.data.folder import ImageFolderDataset
from edmlab.data.idx import IdxDataset, read_idx
from edmlab.data.images import ArrayImageDataset, ImageDataset, load_npz
from edmlab.data.latents import LatentDataModule, LatentDataset
from edmlab.data.sources import open_images
from edmlab.data.toy2d import Toy2DDataset

__all__ = [
    "AugmentPipe", "CIFAR10Dataset", "download_cifar10", "ImageDataModule",
    "InfiniteDataModule", "VectorDataModule", "XFlipDataset", "per_device_batch", "split_batch", "DigitsDataset",
    "ImageFolderDataset", "IdxDataset", "read_idx", "ArrayImageDataset", "ImageDataset", "load_npz", "open_images",
    "Toy2DDataset", "LatentDataModule", "LatentDataset",
]
