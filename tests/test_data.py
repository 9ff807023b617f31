"""edmlab.data: CIFAR-10 tarball, image folders/zips, digits, toy 2-D."""

from __future__ import annotations

import collections
import hashlib
import io
import json
import math
import os
import pickle
import tarfile
import time
import zipfile
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from edmlab.checkpoints.safe_pickle import SNAPSHOT_GLOBALS, AllowlistUnpickler
from edmlab.data import (
    CIFAR10Dataset,
    DigitsDataset,
    ImageFolderDataset,
    Toy2DDataset,
    open_images,
)
from edmlab.data.cifar10 import BATCH_GLOBALS

# --------------------------------------------------------------------------------------------------------
# CIFAR-10


def _batch(n: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {"batch_label": f"batch {seed}", "labels": rng.integers(0, 10, n).tolist(),
            "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            "filenames": [f"img_{seed}_{i}.png" for i in range(n)]}


def _write_tarball(path: Path, n: int = 6) -> dict[str, dict]:
    """A tarball in the official layout; batch 1 pickled with protocol 2 (as the official py2 files)."""
    batches = {f"data_batch_{i}": _batch(n, i) for i in range(1, 6)} | {"test_batch": _batch(n, 9)}
    with tarfile.open(path, "w:gz") as tar:
        for name, batch in batches.items():
            blob = pickle.dumps(batch, protocol=2 if name == "data_batch_1" else pickle.HIGHEST_PROTOCOL)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return batches


@pytest.fixture
def cifar(tmp_path):
    path = tmp_path / "cifar-10-python.tar.gz"
    return path, _write_tarball(path)


def test_cifar_tarball_pixels_and_labels(cifar):
    path, batches = cifar
    ds = CIFAR10Dataset(path.parent, md5=None)
    data = np.concatenate([batches[f"data_batch_{i}"]["data"] for i in range(1, 6)])
    labels = sum((batches[f"data_batch_{i}"]["labels"] for i in range(1, 6)), [])
    assert len(ds) == 30 and ds.image_shape == (3, 32, 32) and ds.label_dim == 10
    k, c, y, x = 13, 2, 5, 17  # official layout: 1024 R values, then G, then B, each row-major
    image, label = ds[k]
    assert image.dtype == torch.uint8 and image[c, y, x] == data[k, c * 1024 + y * 32 + x]
    assert np.array_equal(ds.images.reshape(30, -1), data)
    assert ds.raw_labels.tolist() == labels and label.argmax() == labels[k] and label.sum() == 1
    test = CIFAR10Dataset(path, split="test", md5=None)
    assert np.array_equal(test.images.reshape(6, -1), batches["test_batch"]["data"])


def test_cifar_extracted_folder_matches_tarball(cifar, tmp_path):
    path, _ = cifar
    with tarfile.open(path) as tar:
        tar.extractall(tmp_path / "x", filter="data")
    a, b = CIFAR10Dataset(tmp_path / "x", md5=None), CIFAR10Dataset(path, md5=None)
    assert np.array_equal(a.images, b.images) and np.array_equal(a.raw_labels, b.raw_labels)


def test_cifar_md5_mismatch_is_refused(cifar):
    path, _ = cifar
    with pytest.raises(ValueError, match="md5 .* != expected c58f30108f718f92721af3b95e74349a"):
        CIFAR10Dataset(path)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_cifar_corrupt_or_truncated_tarball_is_refused(cifar, damage):
    path, _ = cifar
    blob = path.read_bytes()
    path.write_bytes(os.urandom(len(blob)) if damage == "garbage" else blob[: len(blob) // 2])
    with pytest.raises(ValueError, match=f"{path}.*corrupt or truncated"):
        CIFAR10Dataset(path, md5=None)


def test_cifar_truncated_batch_is_refused(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for i in range(1, 6):
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(_batch(4, i)))
    blob = (folder / "data_batch_3").read_bytes()
    (folder / "data_batch_3").write_bytes(blob[:-100])
    with pytest.raises(ValueError, match="data_batch_3: corrupt or truncated batch"):
        CIFAR10Dataset(tmp_path)


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_cifar_tampered_batch_cannot_run_code(tmp_path):
    marker = tmp_path / "pwned"
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for i in range(1, 6):
        batch = _batch(4, i) | ({"batch_label": _Evil(marker)} if i == 2 else {})
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(ValueError, match=r"data_batch_2: refusing to load global '(posix|os)\.system'"):
        CIFAR10Dataset(tmp_path)
    assert not marker.exists()
    # Any global outside the allowlist is refused before it is called.
    with pytest.raises(pickle.UnpicklingError, match="builtins.eval"):
        AllowlistUnpickler(io.BytesIO(pickle.dumps(eval)), BATCH_GLOBALS).load()


def test_cifar_reader_refuses_what_only_edm_snapshots_may_hold():
    """The unpickler is shared with EDM snapshots; CIFAR's allowlist is not: an OrderedDict or a torch dtype,
    fine in a snapshot, is refused in a batch."""
    assert set(BATCH_GLOBALS.globals) == {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}
    for value, name in ((collections.OrderedDict(a=1), "collections.OrderedDict"), (torch.float16, "torch.float16")):
        blob = pickle.dumps(value, protocol=2)
        assert AllowlistUnpickler(io.BytesIO(blob), SNAPSHOT_GLOBALS).load() == value
        with pytest.raises(pickle.UnpicklingError, match=rf"refusing to load global '{name}': a CIFAR batch holds"):
            AllowlistUnpickler(io.BytesIO(blob), BATCH_GLOBALS).load()


def test_cifar_missing_names_expected_file_and_fails_fast(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"cifar-10-python\.tar\.gz \(md5 c58f3.*cifar-10-batches-py"):
        CIFAR10Dataset(tmp_path)
    t0 = time.monotonic()  # a refused connection: the download attempt gives up at once with the same help
    with pytest.raises(FileNotFoundError, match=f"put it at {tmp_path / 'cifar-10-python.tar.gz'}"):
        CIFAR10Dataset(tmp_path, download=True, url="http://127.0.0.1:9/cifar-10-python.tar.gz", timeout=2)
    assert time.monotonic() - t0 < 5 and os.listdir(tmp_path) == []


def test_cifar_download_is_md5_checked_and_atomic(cifar, tmp_path):
    src, _ = cifar
    md5 = hashlib.md5(src.read_bytes()).hexdigest()
    dest = tmp_path / "dl"
    with pytest.raises(FileNotFoundError, match="md5 .* does not match the expected c58f30108f718f92721af3b95e74349a"):
        CIFAR10Dataset(dest, download=True, url=src.as_uri())  # official md5 expected: refused, nothing left
    assert os.listdir(dest) == []
    ds = CIFAR10Dataset(dest, download=True, url=src.as_uri(), md5=md5)
    assert len(ds) == 30 and os.listdir(dest) == ["cifar-10-python.tar.gz"]


# --------------------------------------------------------------------------------------------------------
# Image folder / zip


def _images(n: int, shape=(8, 8, 3), seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(n)]


def _write_folder(root: Path, names: list[str], images: list[np.ndarray], labels=None) -> None:
    for name, im in zip(names, images, strict=True):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        PIL.Image.fromarray(im.squeeze()).save(root / name)
    if labels is not None:
        (root / "dataset.json").write_text(json.dumps({"labels": labels}))


def _zip(root: Path, dest: Path) -> Path:
    with zipfile.ZipFile(dest, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for p in sorted(root.rglob("*")):
            if p.is_file():
                z.write(p, p.relative_to(root).as_posix())
    return dest


def test_folder_and_zip_with_labels(tmp_path):
    names = ["b/img2.png", "a/img1.png", "a/img0.png"]  # loader order is sorted: a/img0, a/img1, b/img2
    images = _images(3)
    _write_folder(tmp_path / "d", names, images, labels=[[n, i + 2] for i, n in enumerate(names)])
    for ds in (ImageFolderDataset(tmp_path / "d"), ImageFolderDataset(_zip(tmp_path / "d", tmp_path / "d.zip"))):
        assert ds.names == ["a/img0.png", "a/img1.png", "b/img2.png"]
        assert ds.image_shape == (3, 8, 8) and ds.label_dim == 5  # max label 4 -> 5 classes
        image, label = ds[0]
        assert torch.equal(image, torch.from_numpy(images[2].transpose(2, 0, 1)))
        assert label.tolist() == [0, 0, 0, 0, 1]
        assert ds.raw_labels.tolist() == [4, 3, 2]


def test_folder_grayscale_and_vector_labels(tmp_path):
    images = _images(2, shape=(4, 6, 1))
    _write_folder(tmp_path, ["x.png", "y.png"], images, labels=[["x.png", [0.5, 1]], ["y.png", [2, -1.5]]])
    ds = open_images(tmp_path)
    image, label = ds[1]
    assert image.shape == (1, 4, 6) and torch.equal(image[0], torch.from_numpy(images[1][..., 0]))
    assert ds.label_dim == 2 and label.tolist() == [2.0, -1.5]


def test_folder_errors_name_the_file(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="empty: no images found"):
        ImageFolderDataset(tmp_path / "empty")

    _write_folder(tmp_path / "mixed", ["a.png"], _images(1, (8, 8, 3)))
    _write_folder(tmp_path / "mixed", ["b.png"], _images(1, (8, 8, 1)))
    _write_folder(tmp_path / "mixed", ["c.png"], _images(1, (16, 16, 3)))
    with pytest.raises(ValueError, match=r"'a.png' is 3x8x8 \(CxHxW\) but 'b.png' is 1x8x8"):
        ImageFolderDataset(tmp_path / "mixed")

    _write_folder(tmp_path / "lab", ["a.png", "b.png"], _images(2), labels=[["a.png", 1]])
    with pytest.raises(ValueError, match=r"lab/dataset.json: no label for 1 of 2 images, e.g. 'b.png'"):
        ImageFolderDataset(tmp_path / "lab")
    (tmp_path / "lab" / "dataset.json").write_text(json.dumps({"labels": [["a.png", 1], ["b.png", "cat"]]}))
    with pytest.raises(ValueError, match=r"lab/dataset.json: labels entry 1 \('b.png'\) has label \"cat\""):
        ImageFolderDataset(tmp_path / "lab")
    (tmp_path / "lab" / "dataset.json").write_text(json.dumps({"labels": [["a.png", 1], ["b.png"]]}))
    with pytest.raises(ValueError, match=r"dataset.json: labels entry 1 .* is not \[relpath, label\]"):
        ImageFolderDataset(tmp_path / "lab")
    (tmp_path / "lab" / "dataset.json").write_text("{not json")
    with pytest.raises(ValueError, match="dataset.json: not valid JSON"):
        ImageFolderDataset(tmp_path / "lab")


def test_open_images_npz(tmp_path):
    images = np.stack(_images(3, (8, 8, 3)))
    np.savez(tmp_path / "x.npz", images=images)
    ds = open_images(tmp_path / "x.npz")
    assert len(ds) == 3 and torch.equal(ds[1][0], torch.from_numpy(images[1].transpose(2, 0, 1)))
    assert ds[1][1].shape == (0,)


# --------------------------------------------------------------------------------------------------------
# Digits, toy 2-D


def test_digits():
    from sklearn.datasets import load_digits

    ds = DigitsDataset()
    ref = load_digits()
    assert ds.images.shape == (1797, 1, 8, 8) and ds.images.dtype == np.uint8
    assert ds.images.min() == 0 and ds.images.max() == 255 and ds.label_dim == 10
    assert np.array_equal(ds.images[5, 0], np.rint(ref.images[5] * 255 / 16).astype(np.uint8))
    assert ds.raw_labels.tolist() == ref.target.tolist()


def test_toy2d_mixture_law():
    ds = Toy2DDataset("gmm", n=20000, seed=3)
    assert ds.points.shape == (20000, 2) and ds.points.dtype == np.float32 and ds.label_dim == 3
    frac = np.bincount(ds.raw_labels, minlength=3) / len(ds)
    assert np.abs(frac - [0.5, 0.25, 0.25]).max() < 4 * math.sqrt(0.25 / 20000) * 2
    means = np.stack([ds.points[ds.raw_labels == k].mean(0) for k in range(3)])
    assert np.abs(means - ds.mixture().means.numpy()).max() < 0.01
    assert np.array_equal(Toy2DDataset("gmm", n=50, seed=3).points, Toy2DDataset("gmm", n=50, seed=3).points)


def test_damaged_images_are_named_checked_up_front_or_skipped(tmp_path):
    """A truncated PNG passes the header check; the full check (cached) names it, skip drops it with a count."""
    import zipfile as zf

    folder = tmp_path / "imgs"
    _write_folder(folder, ["a.png", "b.png", "c.png"], _images(3))
    data = (folder / "b.png").read_bytes()
    (folder / "b.png").write_bytes(data[: len(data) // 2])
    lazy = ImageFolderDataset(folder)  # headers only: the damage shows when b.png is decoded
    with pytest.raises(ValueError, match=r"imgs/b.png: cannot decode the image"):
        lazy.load_image(1)
    with pytest.raises(ValueError, match=r"imgs/b.png: cannot decode the image .*\(1 of 3 images cannot be decoded"):
        ImageFolderDataset(folder, full_check=True)
    cache = tmp_path / ".imgs.checked.json"
    assert "b.png" in json.loads(cache.read_text())["bad"]
    skipped = ImageFolderDataset(folder, on_error="skip")
    assert skipped.names == ["a.png", "c.png"] and skipped.skipped == ["b.png"] and len(skipped) == 2

    archive = tmp_path / "mac.zip"
    with zf.ZipFile(archive, "w") as z:
        for name in ("a.png", "c.png"):
            z.write(folder / name, f"imgs/{name}")
        z.writestr("__MACOSX/imgs/._a.png", b"\x00\x05\x16\x07 resource fork")
        z.writestr("imgs/._c.png", b"\x00\x05\x16\x07 resource fork")
    assert ImageFolderDataset(archive).names == ["imgs/a.png", "imgs/c.png"]
