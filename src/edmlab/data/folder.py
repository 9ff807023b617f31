"""A folder or zip of images with optional `dataset.json` labels (EDM `training/dataset.py` format).

Images are all files with an image extension, sorted by their relative path ('/'-separated), except
macOS resource forks (`__MACOSX/`, `._*`); each is decoded by PIL to uint8 CHW (grayscale gets a
channel axis, palette images become RGB or RGBA). Labels come from `dataset.json` at the root:
{"labels": [[relpath, label], ...]} with integer classes (label_dim = max + 1) or float vectors, or
{"labels": null}; no file means unlabeled.

Every decoding error names the file. `full_check` decodes every image once before training (a progress
bar; the result is cached beside the data, keyed by the files' sizes and times), so a truncated file
fails at start-up, not hours in; `on_error="skip"` drops undecodable images with a warning and a count
(it implies the full check); the default, "raise", refuses them.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import PIL.Image

from edmlab.console import progress
from edmlab.data.images import ImageDataset, check_labels

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
LABELS_FILE = "dataset.json"


def _target_mode(img: PIL.Image.Image, name: str) -> str:
    """The 8-bit PIL mode an image is decoded to; it fixes the channel count."""
    mode = img.mode
    if mode in ("1", "L"):
        return "L"
    if mode == "LA":
        return "LA"
    if mode in ("RGBA", "PA") or (mode == "P" and "transparency" in img.info):
        return "RGBA"
    if mode in ("RGB", "P", "CMYK", "YCbCr"):
        return "RGB"
    raise ValueError(f"{name}: unsupported image mode {mode!r}; expected 8-bit grayscale, RGB or RGBA")


def _is_image(name: str) -> bool:
    parts = name.split("/")
    return name.lower().endswith(IMAGE_EXTENSIONS) and "__MACOSX" not in parts and not parts[-1].startswith("._")


def _shape(img: PIL.Image.Image, name: str) -> tuple[int, int, int]:
    return len(_target_mode(img, name)), img.height, img.width


def parse_labels(obj, names: list[str], source: str) -> np.ndarray | None:
    """Labels for `names` (in order) from a parsed dataset.json; errors name `source` and the bad entry."""
    if not isinstance(obj, dict) or "labels" not in obj:
        raise ValueError(f'{source}: expected {{"labels": [[relpath, label], ...]}} or {{"labels": null}}')
    entries = obj["labels"]
    if entries is None:
        return None
    if not isinstance(entries, list):
        raise ValueError(f"{source}: 'labels' must be a list of [relpath, label] pairs or null")
    table: dict[str, int | list] = {}
    for i, entry in enumerate(entries):
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)):
            raise ValueError(f"{source}: labels entry {i} ({json.dumps(entry)[:80]}) is not [relpath, label]")
        label = entry[1]
        is_int = isinstance(label, int) and not isinstance(label, bool)
        is_vec = isinstance(label, list) and len(label) > 0 and all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in label)
        if not (is_int or is_vec):
            raise ValueError(f"{source}: labels entry {i} ({entry[0]!r}) has label {json.dumps(label)[:80]}; "
                             f"expected an integer class or a list of numbers")
        table[entry[0].replace("\\", "/")] = label
    missing = [n for n in names if n not in table]
    if missing:
        raise ValueError(f"{source}: no label for {len(missing)} of {len(names)} images, e.g. {missing[0]!r}")
    values = [table[n] for n in names]
    first = values[0]
    for n, v in zip(names, values, strict=True):
        if isinstance(v, int) != isinstance(first, int) or (isinstance(v, list) and len(v) != len(first)):
            raise ValueError(f"{source}: label of {n!r} ({json.dumps(v)[:80]}) does not match the kind/length "
                             f"of the label of {names[0]!r} ({json.dumps(first)[:80]})")
    return check_labels(np.array(values, dtype=np.int64 if isinstance(first, int) else np.float32),
                        len(names), source)


class ImageFolderDataset(ImageDataset):
    """Images from a folder (searched recursively) or a zip file (stored or deflated)."""

    def __init__(self,
                 path: str | os.PathLike,   # folder or .zip
                 use_labels: bool = True,   # read dataset.json; False ignores it
                 verify: bool = True,       # read every image header at start to refuse mixed sizes/channels
                 preload: bool = False,     # decode every image into memory once
                 full_check: bool = False,  # decode every image once at start (cached beside the data)
                 on_error: str = "raise",   # an undecodable image: "raise" (name it) or "skip" (count, warn)
                 ) -> None:
        super().__init__()
        self.path = Path(path)
        self.name = str(self.path)
        self._zip: zipfile.ZipFile | None = None
        self._zip_pid: int | None = None
        self._is_zip = self.path.is_file()
        if self.path.is_dir():
            names = [p.relative_to(self.path).as_posix() for p in self.path.rglob("*") if p.is_file()]
        elif self.path.is_file() and zipfile.is_zipfile(self.path):
            names = [n for n in self._zipfile().namelist() if not n.endswith("/")]
        elif self.path.exists():
            raise ValueError(f"{self.path}: neither a folder nor a zip file of images")
        else:
            raise FileNotFoundError(f"{self.path}: no such folder or zip file")
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error={on_error!r}: use raise or skip")
        self.names = sorted(n for n in names if _is_image(n))
        if not self.names:
            raise ValueError(f"{self.path}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)} files)")
        self.skipped: list[str] = []
        if full_check or on_error == "skip":
            self._full_check(on_error)

        with self._header(self.names[0]) as img:
            self.image_shape = _shape(img, self._where(self.names[0]))
        if verify:
            for n in self.names[1:]:
                with self._header(n) as img:
                    shape = _shape(img, self._where(n))
                if shape != self.image_shape:
                    raise ValueError(f"{self.path}: images disagree in size/channels: {self.names[0]!r} is "
                                     f"{'x'.join(map(str, self.image_shape))} (CxHxW) but {n!r} is "
                                     f"{'x'.join(map(str, shape))}")

        self.raw_labels = None
        if use_labels and self._exists(LABELS_FILE):
            source = self._where(LABELS_FILE)
            try:
                with self._open(LABELS_FILE) as f:
                    obj = json.load(f)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{source}: not valid JSON ({e})") from None
            self.raw_labels = parse_labels(obj, self.names, source)
        self._images = np.stack([self._decode(i) for i in range(len(self))]) if preload else None

    @contextmanager
    def _header(self, name: str) -> Iterator[PIL.Image.Image]:
        """The image opened lazily (header only); an unreadable file is named."""
        with self._open(name) as f:
            try:
                img = PIL.Image.open(f)
            except (OSError, SyntaxError, ValueError) as e:
                raise ValueError(f"{self._where(name)}: not a readable image ({e})") from None
            with img:
                yield img

    def _fingerprint(self) -> str:
        if self._is_zip:
            st = self.path.stat()
            return f"zip {st.st_size} {st.st_mtime_ns}"
        digest = hashlib.sha256()
        for n in self.names:
            st = (self.path / n).stat()
            digest.update(f"{n} {st.st_size} {st.st_mtime_ns}\n".encode())
        return digest.hexdigest()

    def _cache_path(self) -> Path:
        return self.path.with_name(f".{self.path.name}.checked.json")

    def _full_check(self, on_error: str) -> None:
        """Decode every image (or read the cached result of an earlier check of the same files)."""
        key, cache = self._fingerprint(), self._cache_path()
        try:
            cached = json.loads(cache.read_text())
            bad = dict(cached["bad"]) if cached.get("key") == key else None
        except (OSError, ValueError, KeyError, TypeError):
            bad = None
        if bad is None:
            bad = {}
            with progress(f"checking {len(self.names)} images", len(self.names), transient=True) as advance:
                for name in self.names:
                    try:
                        self._decode_file(name)
                    except ValueError as e:
                        bad[name] = str(e)
                    advance(1)
            try:
                from edmlab.fileio import atomic_write

                with atomic_write(cache, "w") as f:
                    json.dump({"key": key, "bad": bad}, f)
            except OSError:  # read-only data: check again next time
                pass
        if bad and on_error == "raise":
            first = next(iter(bad.values()))
            raise ValueError(f"{first} ({len(bad)} of {len(self.names)} images cannot be decoded; fix or remove "
                             "them, or pass on_error=skip to train without them)")
        if bad:
            log.warning(f"{self.path}: skipping {len(bad)} of {len(self.names)} images that cannot be decoded, "
                        f"e.g. {next(iter(bad.values()))}")
            self.skipped = sorted(bad)
            self.names = [n for n in self.names if n not in bad]
            if not self.names:
                raise ValueError(f"{self.path}: none of the images can be decoded")

    def _where(self, name: str) -> str:
        return f"{self.path}:{name}" if self._is_zip else str(self.path / name)

    def _zipfile(self) -> zipfile.ZipFile:
        # Forked dataloader workers share the parent's file offset; each process opens its own handle.
        if self._zip is None or self._zip_pid != os.getpid():
            self._zip, self._zip_pid = zipfile.ZipFile(self.path), os.getpid()
        return self._zip

    def _open(self, name: str):
        if self._is_zip:
            return io.BytesIO(self._zipfile().read(name))
        return open(self.path / name, "rb")

    def _exists(self, name: str) -> bool:
        if self._is_zip:
            return name in self._zipfile().namelist()
        return (self.path / name).is_file()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_zip": None}

    def __len__(self) -> int:
        return len(self.names)

    def _decode_file(self, name: str) -> np.ndarray:
        try:
            with self._open(name) as f, PIL.Image.open(f) as img:
                mode = _target_mode(img, self._where(name))
                image = np.asarray(img.convert(mode) if img.mode != mode else img)
        except (OSError, SyntaxError) as e:  # truncated or not an image: say which file
            raise ValueError(f"{self._where(name)}: cannot decode the image ({e})") from None
        return (image[:, :, None] if image.ndim == 2 else image).transpose(2, 0, 1)

    def _decode(self, index: int) -> np.ndarray:
        name = self.names[index]
        image = self._decode_file(name)
        if image.shape != self.image_shape:
            raise ValueError(f"{self._where(name)}: image is {'x'.join(map(str, image.shape))} (CxHxW), expected "
                             f"{'x'.join(map(str, self.image_shape))} like {self.names[0]!r}")
        return image

    def load_image(self, index: int) -> np.ndarray:
        return self._images[index] if self._images is not None else self._decode(index)
