"""CIFAR-10 from the official python tarball (Krizhevsky 2009), read with a restricted unpickler.

Accepted sources: `cifar-10-python.tar.gz` (md5-checked) or its extracted `cifar-10-batches-py/` folder,
given directly or inside `root`. The train split is the five `data_batch_*` files (50,000 images), the
test split `test_batch` (10,000). Each batch is a pickled dict with `data` uint8 [N, 3072] (RRR..GGG..BBB,
row-major 32x32 planes) and `labels` (list of 0..9). Batches are read by edmlab's one restricted unpickler
with `BATCH_GLOBALS`, only the globals that format needs, so a tampered batch cannot run code.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import zlib
from pathlib import Path

import numpy as np

from edmlab.checkpoints.errors import UnsafePickleError
from edmlab.checkpoints.safe_pickle import Allowlist, AllowlistUnpickler, latin1_bytes
from edmlab.data.images import ArrayImageDataset
from edmlab.download import download

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
TARBALL = "cifar-10-python.tar.gz"
FOLDER = "cifar-10-batches-py"
SPLITS = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def _numpy_core():
    """numpy 2 moved numpy.core to numpy._core; pickles name either."""
    return np._core if hasattr(np, "_core") else np.core  # pragma: no cover - numpy 1 branch


def _reconstruct(subtype, shape, dtype):
    if subtype is not np.ndarray:
        raise UnsafePickleError(f"refusing array subtype {subtype!r}")
    return _numpy_core().multiarray._reconstruct(subtype, shape, dtype)


def _frombuffer(buffer, dtype, shape, order):
    return _numpy_core().numeric._frombuffer(buffer, dtype, shape, order)


BATCH_GLOBALS = Allowlist({
    **{(m, "_reconstruct"): _reconstruct for m in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{(m, "_frombuffer"): _frombuffer for m in ("numpy.core.numeric", "numpy._core.numeric")},
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): latin1_bytes,
}, "refusing to load global '{name}': a CIFAR batch holds only dicts, lists, bytes and numpy arrays (tampered file?)")


def read_batch(data: bytes, source: str) -> tuple[np.ndarray, np.ndarray]:
    """One pickled batch -> (uint8 [N, 3, 32, 32], int64 [N]); `source` names the file in errors."""
    try:
        batch = AllowlistUnpickler(io.BytesIO(data), BATCH_GLOBALS, encoding="bytes").load()
    except UnsafePickleError as e:
        raise ValueError(f"{source}: {e}") from None
    except Exception as e:  # truncated/garbled pickles raise EOFError, ValueError, KeyError, ...
        raise ValueError(f"{source}: corrupt or truncated batch ({type(e).__name__}: {e})") from None
    if not isinstance(batch, dict):
        raise ValueError(f"{source}: expected a pickled dict, got {type(batch).__name__}")
    batch = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
    images, labels = batch.get("data"), batch.get("labels")
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 2 \
            or images.shape[1] != 3 * 32 * 32:
        got = f"{images.dtype} {images.shape}" if isinstance(images, np.ndarray) else type(images).__name__
        raise ValueError(f"{source}: 'data' must be uint8 [N, 3072], got {got}")
    if not isinstance(labels, list | np.ndarray) or len(labels) != len(images) \
            or not all(isinstance(y, int | np.integer) and 0 <= y < 10 for y in labels):
        raise ValueError(f"{source}: 'labels' must be {len(images)} integers in 0..9")
    return images.reshape(-1, 3, 32, 32), np.asarray(labels, dtype=np.int64)


def md5sum(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _read_tarball(path: Path, names: list[str]) -> dict[str, bytes]:
    """The named batch files from the tarball, read in memory (nothing is extracted to disk)."""
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(path, "r:gz") as tar:
            for member in tar:
                parts = Path(member.name).parts
                if member.isfile() and len(parts) >= 2 and parts[-2] == FOLDER and parts[-1] in names:
                    found[parts[-1]] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise ValueError(f"{path}: corrupt or truncated tarball ({type(e).__name__}: {e}); delete it and "
                         f"download {TARBALL} again") from None
    missing = [n for n in names if n not in found]
    if missing:
        raise ValueError(f"{path}: tarball lacks {', '.join(f'{FOLDER}/{n}' for n in missing)} "
                         f"(truncated, or not {TARBALL})")
    return found


def find_source(root: str | os.PathLike) -> Path | None:
    """The tarball or extracted folder at or inside `root`, or None."""
    root = Path(root)
    if root.is_file():
        return root
    for candidate in (root / FOLDER, root):
        if (candidate / "data_batch_1").is_file() or (candidate / "test_batch").is_file():
            return candidate
    return root / TARBALL if (root / TARBALL).is_file() else None


def is_cifar10_source(path: str | os.PathLike) -> bool:
    path = Path(path)
    if path.is_file():
        return path.name.endswith((".tar.gz", ".tgz"))
    return find_source(path) is not None


def download_cifar10(root: str | os.PathLike, url: str = CIFAR10_URL, md5: str | None = CIFAR10_MD5,
                     timeout: float = 10.0) -> Path:
    """Fetch the tarball into `root` (md5-checked, atomic); fails fast offline with what to do instead."""
    dest = Path(root) / TARBALL
    help_text = (f"Download {TARBALL} (md5 {CIFAR10_MD5}) from {CIFAR10_URL} and put it at {dest} "
                 f"(or its extracted {FOLDER}/ folder at {Path(root) / FOLDER}).")
    try:
        return download(url, dest, timeout=timeout, md5=md5)
    except OSError as e:
        raise FileNotFoundError(f"CIFAR-10 not found and downloading {url} failed ({e}). {help_text}") from None


class CIFAR10Dataset(ArrayImageDataset):
    """CIFAR-10 as uint8 [N, 3, 32, 32] with labels 0..9 (label_dim 10)."""

    def __init__(self,
                 root: str | os.PathLike,             # tarball, extracted folder, or a folder holding either
                 split: str = "train",                # "train" (data_batch_1..5) or "test" (test_batch)
                 download: bool = False,              # fetch the tarball into root when it is missing
                 md5: str | None = CIFAR10_MD5,       # checked on tarballs; None accepts a custom tarball
                 url: str = CIFAR10_URL,
                 timeout: float = 10.0) -> None:      # seconds before an offline download gives up
        if split not in SPLITS:
            raise ValueError(f"unknown CIFAR-10 split {split!r}; valid: {', '.join(SPLITS)}")
        source = find_source(root)
        if source is None:
            if not download:
                raise FileNotFoundError(
                    f"CIFAR-10 not found in {root}: expected {Path(root) / TARBALL} (md5 {CIFAR10_MD5}) or the "
                    f"extracted folder {Path(root) / FOLDER}/. Download it from {CIFAR10_URL} or pass "
                    f"download=True when online.")
            folder = Path(root).parent if Path(root).name == TARBALL else Path(root)
            source, md5 = download_cifar10(folder, url=url, md5=md5, timeout=timeout), None
        names = SPLITS[split]
        if source.is_file():
            if md5 is not None and (got := md5sum(source)) != md5:
                raise ValueError(f"{source}: md5 {got} != expected {md5}; the file is corrupt or incomplete. "
                                 f"Delete it and download {TARBALL} again (md5=None accepts a custom tarball).")
            blobs = _read_tarball(source, names)
            parts = [read_batch(blobs[n], f"{source}:{FOLDER}/{n}") for n in names]
        else:
            missing = [n for n in names if not (source / n).is_file()]
            if missing:
                raise FileNotFoundError(f"{source}: missing {', '.join(missing)} for the {split} split")
            parts = [read_batch((source / n).read_bytes(), str(source / n)) for n in names]
        super().__init__(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
                         label_dim=10, name=f"CIFAR-10 {split} ({source})")
