"""Latent datasets (EDM2's ImageNet-512 recipe): raw VAE latents stored once, final latents drawn per read.

A latent dataset is a folder written by `scripts/encode_latents.py`: `latents.npy` float32 [N, 2C, h, w]
(the VAE posterior's mean and std), optional `labels.npy` (int64 [N] or float32 [N, D]) and `dataset.json`
(the encoder config that made it). `LatentDataModule` yields `(x, labels)` with x = the encoder's final
latents [b, C, h, w], drawn with a generator seeded by (seed, rank, data position), so a resumed run sees
the draws of an uninterrupted one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import get_worker_info

from edmlab.data.datamodule import InfiniteDataModule, ShardedBatches
from edmlab.data.images import ImageDataset, check_labels, square_side
from edmlab.encoders import Encoder

__all__ = ["LatentDataset", "LatentDataModule", "write_latent_dataset", "LATENTS", "LABELS", "META"]

LATENTS, LABELS, META = "latents.npy", "labels.npy", "dataset.json"


class LatentDataset(ImageDataset):
    """Raw latents [2C, h, w] (float32, memory-mapped) and labels as `ImageDataset` gives them."""

    def __init__(self, path: str | os.PathLike, label_dim: int | None = None) -> None:
        super().__init__(label_dim)
        self.path = Path(path)
        if not (self.path / LATENTS).is_file():
            raise FileNotFoundError(f"{self.path}: no {LATENTS}; make a latent dataset with "
                                    "python scripts/encode_latents.py <images> <this folder>")
        self.latents = np.load(self.path / LATENTS, mmap_mode="r")
        labels = np.load(self.path / LABELS) if (self.path / LABELS).is_file() else None
        self.raw_labels = check_labels(labels, len(self.latents), str(self.path))
        self.image_shape = tuple(self.latents.shape[1:])
        self.name = str(self.path)
        meta = self.path / META
        self.meta = json.loads(meta.read_text()) if meta.is_file() else {}

    def __len__(self) -> int:
        return len(self.latents)

    def load_image(self, index: int) -> np.ndarray:
        return self.latents[index]


class _LatentBatches(ShardedBatches):
    """ShardedBatches whose latents are drawn with a generator per (seed, rank, data position)."""

    def __init__(self, seed: int, *args) -> None:
        super().__init__(*args)
        self.seed = seed

    def __iter__(self):
        info = get_worker_info()
        k, step = (info.id, info.num_workers) if info is not None else (0, 1)
        while True:
            position = self.start + k * self.batch_size
            seed = np.random.SeedSequence([self.seed, self.rank, position]).generate_state(2, np.uint32)
            generator = torch.Generator().manual_seed(int(seed[0]) << 32 | int(seed[1]))
            yield self.collate([self.dataset[int(i)] for i in self.batch_indices(k)], generator=generator)
            k += step


class LatentDataModule(InfiniteDataModule):
    """Final latents float32 [b, C, h, w] (the encoder's) with one-hot labels (or None)."""

    def __init__(self,
                 dataset,                          # LatentDataset, a factory returning one, or its folder
                 encoder: Encoder,                 # the encoder that made the dataset (edmlab.encoders)
                 batch_size: int,                  # GLOBAL batch
                 num_workers: int = 0,
                 seed: int | None = 0,
                 use_labels: bool = True,
                 max_size: int | None = None,
                 pin_memory: bool | None = None) -> None:
        super().__init__(dataset, batch_size, num_workers, seed, use_labels, max_size, pin_memory)
        self.encoder = encoder

    @staticmethod
    def _by_name(name: str | os.PathLike) -> LatentDataset:
        return LatentDataset(name)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c, h, w = self.base_dataset.image_shape
        return (c // self.encoder.raw_channels_per_channel, h, w)

    @property
    def img_channels(self) -> int:
        return self.image_shape[0]

    @property
    def img_resolution(self) -> int:
        return square_side(self.image_shape, "latents")

    def collate(self, items: list, generator: torch.Generator | None = None) -> tuple:
        """Final latents drawn from the items' raw latents (EDM2's encode_latents), and labels."""
        raw, labels = super().collate(items)
        return self.encoder.encode_latents(raw.to(torch.float32), generator=generator), labels

    def batches(self, rank: int = 0, world_size: int = 1, start_images: int | None = None) -> _LatentBatches:
        plain = super().batches(rank, world_size, start_images)
        return _LatentBatches(self.seed, plain.dataset, plain.batch_size, self.seed, rank, world_size, plain.start,
                              self.collate)


def write_latent_dataset(folder: str | os.PathLike, chunks: Iterable[np.ndarray], shape: tuple[int, ...],
                         labels: np.ndarray | None, meta: dict) -> Path:
    """Write a latent dataset, streaming `chunks` (float32 [n_i, 2C, h, w], sum n_i = shape[0]) to disk."""
    from edmlab.fileio import atomic_write

    folder = Path(folder)
    written = 0
    with atomic_write(folder / LATENTS) as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": tuple(shape)})
        for chunk in chunks:
            chunk = np.ascontiguousarray(chunk, dtype="<f4")
            if chunk.shape[1:] != tuple(shape[1:]):
                raise ValueError(f"latent chunk of shape {chunk.shape[1:]}, expected {tuple(shape[1:])}")
            f.write(chunk.tobytes())
            written += len(chunk)
        if written != shape[0]:
            raise ValueError(f"{written} latents written, {shape[0]} announced")
    if labels is not None:
        with atomic_write(folder / LABELS) as f:
            np.save(f, labels)
    with atomic_write(folder / META, "w") as f:
        json.dump(meta, f, indent=2)
    return folder
