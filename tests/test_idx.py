"""MNIST / Fashion-MNIST idx files: gzip or raw, zero-padded to 32x32, one clear error per bad file."""

from __future__ import annotations

import gzip
import hashlib
import struct
from pathlib import Path

import numpy as np
import pytest

import edmlab.data.idx as idx
from edmlab.data import IdxDataset, read_idx


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_split(folder: Path, split: str, images: np.ndarray, labels: np.ndarray, gz: bool = True) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for stem, array in zip(idx.FILES[split], (images, labels), strict=True):
        data = idx_bytes(array)
        (folder / (stem + ".gz" if gz else stem)).write_bytes(gzip.compress(data) if gz else data)


def sample_arrays(n: int = 7) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n).astype(np.uint8)


@pytest.mark.parametrize("gz", [True, False], ids=["gzip", "raw"])
def test_reads_and_pads_to_32(tmp_path, gz):
    images, labels = sample_arrays()
    write_split(tmp_path, "test", images, labels, gz=gz)
    data = IdxDataset("fashion_mnist", root=tmp_path, split="test")
    assert len(data) == 7 and data.image_shape == (1, 32, 32) and data.label_dim == 10
    np.testing.assert_array_equal(data.images[:, 0, 2:30, 2:30], images)  # centred, pixels untouched
    assert data.images[:, :, :2].max() == 0 and data.images[:, :, :, 30:].max() == 0  # zero border
    image, label = data[3]
    assert image.dtype.is_floating_point is False and label.tolist() == np.eye(10)[labels[3]].tolist()
    assert IdxDataset("mnist", root=tmp_path, split="test", resolution=28).image_shape == (1, 28, 28)


def test_corrupt_and_truncated_files_name_the_file(tmp_path):
    images, labels = sample_arrays()
    path = tmp_path / "x-idx3-ubyte"
    path.write_bytes(idx_bytes(images)[:-5])
    with pytest.raises(ValueError, match=r"x-idx3-ubyte: truncated or corrupt idx file: header says \(7, 28, 28\)"):
        read_idx(path, 3)
    gz = tmp_path / "y-idx3-ubyte.gz"
    gz.write_bytes(gzip.compress(idx_bytes(images))[:100])
    with pytest.raises(ValueError, match=r"y-idx3-ubyte\.gz: corrupt or truncated gzip"):
        read_idx(gz, 3)
    path.write_bytes(b"\x01\x02\x03")
    with pytest.raises(ValueError, match="x-idx3-ubyte: not an idx file"):
        read_idx(path, 3)
    path.write_bytes(idx_bytes(labels))
    with pytest.raises(ValueError, match="with 1 dimensions; expected uint8 .* with 3"):
        read_idx(path, 3)
    write_split(tmp_path / "bad", "train", images, labels[:5])
    with pytest.raises(ValueError, match="7 images but .* 5 labels"):
        IdxDataset("fashion_mnist", root=tmp_path / "bad")


def test_missing_files_say_where_to_put_them(tmp_path, monkeypatch):
    monkeypatch.setitem(idx.SETS["fashion_mnist"], "system_dirs", ())
    with pytest.raises(FileNotFoundError, match=r"Fashion-MNIST train files train-images-idx3-ubyte\[\.gz\]"):
        IdxDataset("fashion_mnist", root=tmp_path)
    with pytest.raises(ValueError, match="unknown idx dataset 'kmnist'"):
        IdxDataset("kmnist", root=tmp_path)


def test_download_fetches_the_official_files_with_their_md5(tmp_path, monkeypatch):
    images, labels = sample_arrays()
    blobs = {stem + ".gz": gzip.compress(idx_bytes(a)) for stem, a in zip(idx.FILES["test"], (images, labels),
                                                                          strict=True)}
    calls = []

    def fake_download(url, dest, *, timeout, md5):
        name = url.rsplit("/", 1)[-1]
        calls.append((url, md5))
        if hashlib.md5(blobs[name]).hexdigest() != md5:  # stands in for edmlab.download's md5 check
            raise OSError(f"{url}: md5 mismatch")
        Path(dest).write_bytes(blobs[name])
        return Path(dest)

    monkeypatch.setattr(idx, "download", fake_download)
    monkeypatch.setitem(idx.SETS["mnist"], "md5", {k: hashlib.md5(v).hexdigest() for k, v in blobs.items()})
    data = IdxDataset("mnist", root=tmp_path, split="test", download=True)
    assert len(data) == 7 and [u for u, _ in calls] == [idx.SETS["mnist"]["url"] + n for n in blobs]
    monkeypatch.setitem(idx.SETS["mnist"], "md5", {k: "0" * 32 for k in blobs})
    with pytest.raises(FileNotFoundError, match="md5 mismatch"):
        IdxDataset("mnist", root=tmp_path / "other", split="test", download=True)


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz").is_file(),
                    reason="Debian's dataset-fashion-mnist is not installed (apt-get install dataset-fashion-mnist)")
def test_debian_fashion_mnist_test_split():
    data = IdxDataset("fashion_mnist", root=None, split="test")
    assert len(data) == 10_000 and np.bincount(data.raw_labels).tolist() == [1000] * 10
