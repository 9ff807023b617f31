"""LightningDataModules with an infinite, seeded, rank-sharded and resumable data order.

Batch format (one convention for every module here):
  * `ImageDataModule` yields `(images, labels)`: images float32 [b, C, H, W] in [-1, 1] (uint8 / 127.5 - 1,
    as EDM); labels float32 [b, label_dim] (one-hot classes, or the dataset's float vectors), or **None**
    when unconditional (`use_labels=False` or an unlabeled dataset), so `class_labels=labels` can be
    passed straight to the Denoiser.
  * `VectorDataModule` yields `(points, labels)`: points float32 [b, D], labels as above.
`batch_size` is the GLOBAL batch; each device loads b = batch_size / (world_size x accumulate_grad_batches)
per micro-batch (derived from the trainer in `setup`).

Data order: global sample position g = 0, 1, 2, ... maps to dataset index perm_{g // N}[g % N], with one
seeded permutation per pass (numpy `default_rng([seed, pass])`); there are no epochs, training is measured
in images. Rank r of W takes positions g = p W + r for its own positions p = 0, 1, ..., so a step of the
whole job consumes one contiguous block of `batch_size` global positions. `state_dict()` stores the images
consumed (`trainer.global_step x batch_size`); `load_state_dict()` restores it and the next dataloader
starts there, so a resumed run sees exactly the batches of an uninterrupted one (also after a change of
device count, as long as the global batch stays the same). Lightning calls `load_state_dict` before it
builds the dataloaders.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset, get_worker_info

from edmlab.data.images import ImageDataset, square_side
from edmlab.data.sources import open_images
from edmlab.data.toy2d import Toy2DDataset


def per_device_batch(global_batch: int, world_size: int = 1, accumulate: int = 1) -> int:
    """Micro-batch per device: global_batch / (world_size x accumulate), which must divide exactly."""
    if global_batch % (world_size * accumulate):
        raise ValueError(f"global batch_size {global_batch} is not divisible by world_size {world_size} x "
                         f"accumulate_grad_batches {accumulate}; change data.batch_size or the device count")
    return global_batch // (world_size * accumulate)


def split_batch(global_batch: int, world_size: int = 1, max_per_device: int | None = None) -> tuple[int, int]:
    """(per-device batch, accumulation steps): the fewest accumulation steps keeping b <= max_per_device."""
    per_device_batch(global_batch, world_size)
    limit = max_per_device or global_batch
    for accumulate in range(1, global_batch // world_size + 1):
        if global_batch % (world_size * accumulate) == 0 and global_batch // (world_size * accumulate) <= limit:
            return global_batch // (world_size * accumulate), accumulate
    raise ValueError(f"cannot split batch {global_batch} over {world_size} devices")  # pragma: no cover


class IndexStream:
    """Global sample position -> dataset index: one seeded permutation per pass over the data."""

    def __init__(self, n: int, seed: int) -> None:
        if n <= 0:
            raise ValueError("the dataset is empty")
        self.n, self.seed = n, seed
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) >= 4:
                self._perms.pop(min(self._perms))
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return self._perms[epoch]

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        epochs, offsets = np.divmod(np.asarray(positions, dtype=np.int64), self.n)
        out = np.empty(len(offsets), dtype=np.int64)
        for epoch in np.unique(epochs):
            mask = epochs == epoch
            out[mask] = self._perm(int(epoch))[offsets[mask]]
        return out


class ShardedBatches(IterableDataset):
    """Endless collated batches for one rank; dataloader workers take turns, so the order is deterministic."""

    def __init__(self, dataset: Dataset, batch_size: int, seed: int, rank: int, world_size: int, start: int,
                 collate: Callable[[list], tuple]) -> None:
        self.dataset, self.batch_size, self.rank, self.world_size = dataset, batch_size, rank, world_size
        self.start, self.collate = start, collate
        self.stream = IndexStream(len(dataset), seed)

    def batch_indices(self, k: int) -> np.ndarray:
        """Dataset indices of this rank's k-th batch after `start`."""
        p = self.start + k * self.batch_size + np.arange(self.batch_size)
        return self.stream(p * self.world_size + self.rank)

    def __iter__(self):
        info = get_worker_info()
        k, step = (info.id, info.num_workers) if info is not None else (0, 1)
        while True:
            yield self.collate([self.dataset[int(i)] for i in self.batch_indices(k)])
            k += step


def _as_is(batch):
    """Batches arrive collated; the default would turn the (x, labels) tuple into a list."""
    return batch


class XFlipDataset(Dataset):
    """EDM's --xflip: the dataset followed by its mirror images (2N items)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return 2 * len(self.dataset)

    def __getitem__(self, index: int):
        n = len(self.dataset)
        image, label = self.dataset[index % n]
        return (image.flip(-1) if index >= n else image), label


def _resolve(dataset, by_name: Callable[[str | os.PathLike], Dataset] = open_images) -> Dataset:
    """A Dataset, a factory (Hydra `_partial_: true`) returning one, or a name/path for `by_name`."""
    if isinstance(dataset, str | os.PathLike):
        return by_name(dataset)
    if not isinstance(dataset, Dataset) and callable(dataset):
        dataset = dataset()
    if not isinstance(dataset, Dataset):
        raise TypeError(f"dataset must be a torch Dataset, a factory returning one, or a path; got {dataset!r}")
    return dataset


class InfiniteDataModule(L.LightningDataModule):
    """Shared machinery: lazy dataset, per-device batch, sharded endless order, resumable position."""

    def __init__(self,
                 dataset,                          # Dataset, factory (Hydra partial) or path
                 batch_size: int,                  # GLOBAL batch over all devices and accumulation steps
                 num_workers: int = 0,             # dataloader worker processes per device
                 seed: int | None = 0,             # data-order seed (None -> 0)
                 use_labels: bool = True,          # False trains unconditionally even on labeled data
                 max_size: int | None = None,      # keep a seeded random subset of this many items
                 pin_memory: bool | None = None) -> None:  # None: pin when CUDA is available
        super().__init__()
        if int(batch_size) <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self._dataset_arg = dataset
        self._dataset: Dataset | None = None
        self._base: Dataset | None = None
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.seed = int(seed or 0)
        self.use_labels = bool(use_labels)
        self.max_size = max_size
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)
        self.batch_size_per_device: int | None = None
        self._start_images, self._start_step = 0, 0

    # -- dataset ---------------------------------------------------------------------------------------
    @staticmethod
    def _by_name(name: str | os.PathLike) -> Dataset:
        return open_images(name)

    def _wrap(self, base: Dataset) -> Dataset:
        if self.max_size is not None and self.max_size < len(base):
            keep = np.random.RandomState(self.seed % (1 << 31)).permutation(len(base))[: self.max_size]
            base = Subset(base, np.sort(keep).tolist())
        return base

    @property
    def base_dataset(self) -> Dataset:
        """The dataset as given (built on first use), before subsetting and flips."""
        if self._base is None:
            self._base = _resolve(self._dataset_arg, self._by_name)
        return self._base

    @property
    def dataset(self) -> Dataset:
        """The dataset actually sampled."""
        if self._dataset is None:
            self._dataset = self._wrap(self.base_dataset)
        return self._dataset

    @property
    def label_dim(self) -> int:
        return int(getattr(self.base_dataset, "label_dim", 0)) if self.use_labels else 0

    def prepare_data(self) -> None:
        self.dataset  # noqa: B018 - builds (and downloads, where the dataset does) on local rank 0 first

    # -- distribution ----------------------------------------------------------------------------------
    def _topology(self) -> tuple[int, int, int]:
        """(world_size, accumulate_grad_batches, global_rank) from the attached trainer, else (1, 1, 0)."""
        t = self.trainer
        if t is None:
            return 1, 1, 0
        return int(t.world_size), int(getattr(t, "accumulate_grad_batches", 1)), int(t.global_rank)

    def setup(self, stage: str | None = None) -> None:
        world_size, accumulate, _ = self._topology()
        self.batch_size_per_device = per_device_batch(self.batch_size, world_size, accumulate)

    # -- resumable position ----------------------------------------------------------------------------
    def _global_step(self) -> int:
        return int(self.trainer.global_step) if self.trainer is not None else self._start_step

    @property
    def images_consumed(self) -> int:
        """Images the job has trained on: the global position where the next step starts."""
        return self._start_images + (self._global_step() - self._start_step) * self.batch_size

    def state_dict(self) -> dict:
        return {"images": self.images_consumed, "global_step": self._global_step(), "seed": self.seed,
                "batch_size": self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        if int(state.get("seed", self.seed)) != self.seed:
            warnings.warn(f"resuming with data seed {self.seed}, checkpoint used {state['seed']}: the data order "
                          f"after the resume differs from the original run", stacklevel=2)
        self._start_images, self._start_step = int(state["images"]), int(state["global_step"])

    # -- loading ---------------------------------------------------------------------------------------
    def collate(self, items: list) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = torch.stack([item[0] for item in items])
        labels = torch.stack([item[1] for item in items]).float() if self.label_dim else None
        return x, labels

    def batches(self, rank: int = 0, world_size: int = 1, start_images: int | None = None) -> ShardedBatches:
        """The endless batch sequence of one rank, starting at `start_images` global images."""
        start = self.images_consumed if start_images is None else start_images
        if start % world_size:
            raise ValueError(f"data position {start} images is not a multiple of world_size {world_size}")
        _, accumulate, _ = self._topology()
        b = per_device_batch(self.batch_size, world_size, accumulate)
        return ShardedBatches(self.dataset, b, self.seed, rank, world_size, start // world_size, self.collate)

    def train_dataloader(self) -> DataLoader:
        world_size, _, rank = self._topology()
        self._start_images, self._start_step = self.images_consumed, self._global_step()
        return DataLoader(self.batches(rank, world_size, self._start_images), batch_size=None,
                          collate_fn=_as_is, num_workers=self.num_workers, pin_memory=self.pin_memory)


class ImageDataModule(InfiniteDataModule):
    """Images as float32 [b, C, H, W] in [-1, 1] with one-hot labels (or None); see the module docstring."""

    def __init__(self, dataset, batch_size: int, num_workers: int = 0, xflip: bool = False, seed: int | None = 0,
                 use_labels: bool = True, max_size: int | None = None, pin_memory: bool | None = None) -> None:
        super().__init__(dataset, batch_size, num_workers, seed, use_labels, max_size, pin_memory)
        self.xflip = bool(xflip)  # EDM --xflip: also train on mirrored images (dataset doubled)

    def _wrap(self, base: Dataset) -> Dataset:
        base = super()._wrap(base)
        return XFlipDataset(base) if self.xflip else base

    @property
    def image_shape(self) -> tuple[int, int, int]:
        ds = self.base_dataset
        if isinstance(ds, ImageDataset) or hasattr(ds, "image_shape"):
            return tuple(ds.image_shape)
        return tuple(ds[0][0].shape)

    @property
    def img_channels(self) -> int:
        return self.image_shape[0]

    @property
    def img_resolution(self) -> int:
        return square_side(self.image_shape, "dataset")

    def collate(self, items: list) -> tuple[torch.Tensor, torch.Tensor | None]:
        images, labels = super().collate(items)
        if images.dtype != torch.uint8:
            raise TypeError(f"image datasets must yield uint8 images, got {images.dtype}")
        return images.to(torch.float32) / 127.5 - 1, labels


class VectorDataModule(InfiniteDataModule):
    """Points float32 [b, D] (e.g. `Toy2DDataset`, or its name) with one-hot labels (or None)."""

    @staticmethod
    def _by_name(name: str | os.PathLike) -> Dataset:
        return Toy2DDataset(str(name))

    @property
    def dim(self) -> int:
        return int(self.base_dataset[0][0].shape[-1])

    def collate(self, items: list) -> tuple[torch.Tensor, torch.Tensor | None]:
        points, labels = super().collate(items)
        return points.to(torch.float32), labels
