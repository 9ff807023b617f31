"""MNIST and Fashion-MNIST from their original idx files (LeCun et al. 1998; Xiao et al. 2017).

An idx file is a big-endian header (two zero bytes, type code 0x08 = uint8, the number of dimensions, then
each dimension as uint32) followed by the data; the published files are gzipped (`*-ubyte.gz`), and
extracted ones (`*-ubyte`) are read too. The 28x28 digits/garments are zero-padded by 2 pixels to 32x32:
both sets have a black (0) background, so padding adds background without resampling any pixel, and 32 is
the side the U-Nets' 2x downsamplings need (EDM's CIFAR-10 resolution).

Sources, first found: `root` (a folder with the four files), then Debian's `dataset-fashion-mnist`
location `/usr/share/datasets/fashion-mnist/` for Fashion-MNIST; else, with `download=True`, the official
files are fetched into `root` and md5-checked.
"""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import numpy as np

from edmlab.data.images import ArrayImageDataset
from edmlab.download import download

IDX_UINT8 = 0x08
NATIVE_SIDE = 28
FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
SETS = {
    "fashion_mnist": dict(
        title="Fashion-MNIST",
        url="https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
        system_dirs=("/usr/share/datasets/fashion-mnist",),  # Debian: apt-get install dataset-fashion-mnist
        md5={"train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
             "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
             "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
             "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310"},
        classes=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                 "Ankle boot")),
    "mnist": dict(
        title="MNIST",
        url="https://ossci-datasets.s3.amazonaws.com/mnist/",
        system_dirs=(),
        md5={"train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
             "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
             "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
             "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c"},
        classes=tuple(str(i) for i in range(10))),
}


def read_idx(path: str | os.PathLike, ndim: int) -> np.ndarray:
    """A uint8 idx array with `ndim` dimensions from `path` (gzipped when it ends in .gz); ValueError names it."""
    path = Path(path)
    try:
        data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise ValueError(f"{path}: corrupt or truncated gzip ({e}); delete it and fetch it again") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: not an idx file (the first two bytes must be zero)")
    if data[2] != IDX_UINT8 or data[3] != ndim:
        raise ValueError(f"{path}: idx type 0x{data[2]:02x} with {data[3]} dimensions; expected uint8 (0x08) "
                         f"with {ndim}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: truncated idx header ({len(data)} bytes)")
    shape = tuple(int(d) for d in np.frombuffer(data, ">u4", ndim, 4))
    if len(data) - header != int(np.prod(shape)):
        raise ValueError(f"{path}: truncated or corrupt idx file: header says {shape} = {int(np.prod(shape))} "
                         f"bytes, found {len(data) - header}")
    return np.frombuffer(data, np.uint8, offset=header).reshape(shape)


def _find(folder: Path, stem: str) -> Path | None:
    for name in (f"{stem}.gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def pad_to(images: np.ndarray, side: int) -> np.ndarray:
    """[N, h, w] -> [N, 1, side, side] with the image centred on zeros (the sets' background)."""
    n, h, w = images.shape
    if side < max(h, w):
        raise ValueError(f"resolution {side} is smaller than the {h}x{w} images; padding only grows them")
    top, left = (side - h) // 2, (side - w) // 2
    out = np.zeros((n, 1, side, side), np.uint8)
    out[:, 0, top:top + h, left:left + w] = images
    return out


class IdxDataset(ArrayImageDataset):
    """MNIST-format images uint8 [N, 1, resolution, resolution] (zero-padded) with labels 0..9."""

    def __init__(self,
                 name: str = "fashion_mnist",          # fashion_mnist | mnist
                 root: str | os.PathLike | None = None,  # folder with the idx files (download target)
                 split: str = "train",                 # train (60,000) | test (10,000)
                 resolution: int = 32,                 # zero-padded side; 28 keeps the originals
                 download: bool = False,               # fetch the official files into root when missing
                 timeout: float = 20.0) -> None:
        if name not in SETS:
            raise ValueError(f"unknown idx dataset {name!r}; valid: {', '.join(SETS)}")
        if split not in FILES:
            raise ValueError(f"unknown split {split!r}; valid: {', '.join(FILES)}")
        spec = SETS[name]
        folders = ([Path(root)] if root is not None else []) + [Path(d) for d in spec["system_dirs"]]
        stems = FILES[split]
        for folder in folders:
            paths = [_find(folder, s) for s in stems]
            if all(paths):
                break
        else:
            paths = self._download(spec, root, stems, timeout) if download else None
            if paths is None:
                where = ", ".join(str(f) for f in folders) or "(no root given)"
                raise FileNotFoundError(f"{spec['title']} {split} files {stems[0]}[.gz] and {stems[1]}[.gz] not "
                                        f"found in {where}; pass download=true (online) or put the official "
                                        f"files from {spec['url']} in root")
        images, labels = read_idx(paths[0], 3), read_idx(paths[1], 1)
        if len(images) != len(labels):
            raise ValueError(f"{paths[0]} has {len(images)} images but {paths[1]} has {len(labels)} labels")
        if len(labels) and labels.max() > 9:
            raise ValueError(f"{paths[1]}: label {int(labels.max())} outside 0..9")
        self.classes = spec["classes"]
        super().__init__(pad_to(images, resolution), labels.astype(np.int64), label_dim=10,
                         name=f"{spec['title']} {split} ({paths[0].parent})")

    @staticmethod
    def _download(spec: dict, root, stems, timeout: float) -> list[Path]:
        if root is None:
            raise FileNotFoundError(f"{spec['title']}: download=true needs a root folder to download into")
        out = []
        for stem in stems:
            name = f"{stem}.gz"
            try:
                out.append(download(spec["url"] + name, Path(root) / name, timeout=timeout, md5=spec["md5"][name]))
            except OSError as e:
                raise FileNotFoundError(f"{spec['title']}: downloading {spec['url']}{name} failed ({e}); put the "
                                        f"official file at {Path(root) / name}") from None
        return out
