"""Where generated images go: per-seed PNGs (EDM's layout), one npz per seed list, or one grid picture.

A writer takes one rank's batches: `resume` says which of its seeds are already on disk, `write` stores a
batch, `close` finishes (npz parts merged, the grid drawn) and returns the files. Every file is written
atomically, so a killed run never leaves a truncated image under its final name; the settings manifest
refuses a resume with other settings (skipped seeds would not match).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edmlab.fileio import atomic_write
from edmlab.generation.batches import Batch
from edmlab.generation.pixels import to_uint8

__all__ = ["MANIFEST", "Writer", "PngWriter", "NpzWriter", "GridWriter", "open_writer", "png_path", "save_png",
           "save_npz", "check_manifest", "remove_stale_tmp", "npz_name", "npz_part", "merge_npz_parts"]

log = logging.getLogger(__name__)

MANIFEST = "sample_settings.json"


class Writer:
    """One rank's output: rank r of `world_size` writes the seed chunks r, r + W, ... of the seed list."""

    def __init__(self, outdir: Path, seeds: Sequence[int], shape: Sequence[int], rank: int = 0,
                 world_size: int = 1) -> None:
        self.outdir, self.seeds, self.shape = Path(outdir), list(seeds), tuple(shape)
        self.rank, self.world_size = rank, world_size

    def resume(self, mine: Sequence[int]) -> set[int]:
        """The seeds of `mine` (this rank's share) already written; their batches need no sampling."""
        return set()

    def write(self, batch: Batch) -> list[int]:
        """Store a batch; returns the seeds it wrote (not those already on disk)."""
        raise NotImplementedError

    def close(self) -> list[Path]:
        """Finish the output; returns the files that hold this rank's seeds."""
        raise NotImplementedError


def _check_images(shape: Sequence[int]) -> None:
    if len(shape) != 3 or shape[0] not in (1, 3, 4):
        raise ValueError(f"samples of shape {list(shape)} are not 1-, 3- or 4-channel images; use format=npz "
                         "(grid=false)")


class PngWriter(Writer):
    """outdir/{seed - seed % 1000:06d}/{seed:06d}.png per seed; existing files are kept, never rewritten."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _check_images(self.shape)
        self.done: set[int] = set()
        self.written: list[int] = []

    def resume(self, mine: Sequence[int]) -> set[int]:
        # A batch with a seed missing is recomputed whole (same batch, same bytes); only missing files are written.
        self.done = {s for s in mine if png_path(self.outdir, s).is_file()}
        remove_stale_tmp(self.outdir, set(mine) - self.done)
        return self.done

    def write(self, batch: Batch) -> list[int]:
        new = []
        for seed, pixels in zip(batch.seeds, to_uint8(batch.images, channels_last=True).cpu().numpy(), strict=True):
            if seed not in self.done:
                save_png(pixels, png_path(self.outdir, seed))
                new.append(seed)
        self.written += new
        return new

    def close(self) -> list[Path]:
        return [png_path(self.outdir, s) for s in self.written]


class NpzWriter(Writer):
    """outdir/`npz_name(seeds)`: images (uint8 NHWC; `samples` float32 for vector data), seeds, labels (-1: none).

    With several ranks each writes a hidden part; whichever finds all parts written merges them.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.whole = self.outdir / npz_name(self.seeds)
        self.path = self.whole if self.world_size == 1 else npz_part(self.outdir, self.rank, self.world_size,
                                                                      self.whole.name)
        self.mine: list[int] = []
        self.images: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []
        self.written: list[int] = []
        self.finished: list[Path] | None = None

    def resume(self, mine: Sequence[int]) -> set[int]:
        self.mine = list(mine)
        if self.path.is_file() and _npz_seeds(self.path) == self.mine:
            return set(mine)  # this rank's part (or the whole single-process file) is written; close() merges
        if self.whole.is_file() and set(_npz_seeds(self.whole)) >= set(self.seeds):
            log.info(f"{self.whole} already holds every seed; nothing to do")
            self.finished = [self.whole]
            return set(mine)
        return set()

    def write(self, batch: Batch) -> list[int]:
        self.images.append(to_uint8(batch.images, channels_last=True).cpu().numpy() if len(self.shape) == 3
                           else batch.images.float().cpu().numpy())
        self.labels.append(np.full(len(batch.seeds), -1) if batch.labels is None else batch.labels.cpu().numpy())
        self.written += batch.seeds
        return list(batch.seeds)

    def close(self) -> list[Path]:
        if self.finished is not None:
            return self.finished
        if self.written or not self.mine:  # a rank without seeds still writes its (empty) part
            pixels = len(self.shape) == 3
            key, item = ("images", (*self.shape[1:], self.shape[0])) if pixels else ("samples", self.shape)
            empty = np.zeros((0, *item), np.uint8 if pixels else np.float32)
            save_npz(self.path, **{key: np.concatenate(self.images) if self.images else empty,
                                   "seeds": np.array(self.written, dtype=np.int64),
                                   "labels": np.concatenate([np.zeros(0, np.int64), *self.labels]).astype(np.int64)})
        merged = merge_npz_parts(self.outdir, self.seeds, self.world_size) if self.world_size > 1 else None
        return [merged or self.path]


class GridWriter(Writer):
    """outdir/grid.png: every seed in one square-ish picture, row-major; rank 0 draws it all."""

    def __init__(self, outdir: Path, seeds: Sequence[int], shape: Sequence[int]) -> None:
        super().__init__(outdir, seeds, shape)
        _check_images(self.shape)
        self.images: list[torch.Tensor] = []

    def write(self, batch: Batch) -> list[int]:
        self.images.append(batch.images.cpu())
        return list(batch.seeds)

    def close(self) -> list[Path]:
        from edmlab.generation.grid import image_grid
        from edmlab.generation.grid import save_png as save_picture

        picture = image_grid(torch.cat(self.images), ncol=math.ceil(math.sqrt(len(self.seeds))))
        return [save_picture(picture, self.outdir / "grid.png")]


def open_writer(outdir: str | os.PathLike, seeds: Sequence[int], shape: Sequence[int], *, format: str = "png",
                grid: bool = False, rank: int = 0, world_size: int = 1) -> Writer | None:
    """The writer of `format` (png or npz) or of the grid picture; None for ranks other than 0 of a grid."""
    if format not in ("png", "npz"):
        raise ValueError(f"format={format!r}: use png or npz")
    if grid:
        writer = GridWriter(Path(outdir), seeds, shape)  # every rank checks the shape; rank 0 draws
        return writer if rank == 0 else None
    kind = PngWriter if format == "png" else NpzWriter
    return kind(Path(outdir), seeds, shape, rank, world_size)


def png_path(outdir: str | os.PathLike, seed: int) -> Path:
    """EDM's --subdirs layout: outdir/{seed - seed % 1000:06d}/{seed:06d}.png."""
    return Path(outdir) / f"{seed - seed % 1000:06d}" / f"{seed:06d}.png"


def _atomic(path: Path):
    """edmlab.fileio.atomic_write without fsync: per-image fsyncs would dominate writing 50k PNGs."""
    return atomic_write(path, "wb", fsync=False)


def save_png(pixels: np.ndarray, path: Path) -> None:
    """One HWC uint8 image: never a truncated PNG under its final name, even if the process is killed."""
    import PIL.Image

    with _atomic(path) as f:
        PIL.Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(f, format="PNG")


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    """np.savez, atomically."""
    with _atomic(path) as f:
        np.savez(f, **arrays)


def _npz_seeds(path: Path) -> list[int]:
    with np.load(path) as f:
        return f["seeds"].tolist()


def _shown(settings: Mapping[str, Any], key: str) -> str:
    """A setting as the manifest error names it; settings such as guidance are stored only off their default."""
    return repr(settings[key]) if key in settings else "the default"


def check_manifest(outdir: Path, settings: Mapping[str, Any] | None, rank: int) -> None:
    """Refuse to resume into a folder written with other settings (skipped seeds would not match)."""
    if settings is None:
        return
    path = outdir / MANIFEST
    settings = json.loads(json.dumps(settings, default=str))
    if path.is_file():
        old = json.loads(path.read_text())
        diff = [f"{k}: {_shown(old, k)} there, {_shown(settings, k)} now" for k in sorted(set(old) | set(settings))
                if old.get(k) != settings.get(k)]
        if diff:
            raise ValueError(f"{outdir} holds samples written with other settings ({'; '.join(diff)}). Choose "
                             f"another outdir, or delete {path} (and the images) to start over")
    elif rank == 0:
        with _atomic(path) as f:
            f.write((json.dumps(settings, indent=2, sort_keys=True) + "\n").encode())


def remove_stale_tmp(outdir: Path, seeds: set[int]) -> None:
    """Delete temporary files a killed run left for these seeds (each seed belongs to one rank)."""
    for folder in {png_path(outdir, s).parent for s in seeds}:
        for tmp in folder.glob(".*.png.*.tmp"):  # edmlab.fileio.tmp_name
            stem = tmp.name[1:].split(".", 1)[0]
            if stem.isdigit() and int(stem) in seeds:
                tmp.unlink(missing_ok=True)


def npz_name(seeds: Sequence[int]) -> str:
    """samples-<first>-<last>.npz for a seed range (EDM's FID protocol writes three ranges into one folder);
    other seed lists add a digest of the list, so two lists never share a file."""

    lo, hi = min(seeds), max(seeds)
    name = f"samples-{lo:06d}-{hi:06d}"
    if list(seeds) != list(range(lo, hi + 1)):
        name += "-" + hashlib.sha1(",".join(map(str, seeds)).encode()).hexdigest()[:8]
    return name + ".npz"


def npz_part(outdir: Path, rank: int, world: int, name: str) -> Path:
    """The hidden file that holds one rank's share of `name` until the merge."""
    return outdir / f".{Path(name).stem}-part{rank:04d}-of-{world:04d}.npz"


def merge_npz_parts(outdir: Path, seeds: Sequence[int], world: int) -> Path | None:
    """Whichever rank finds every part written merges them in seed-list order (an O_EXCL lock picks one)."""
    name = npz_name(seeds)
    parts = [npz_part(outdir, r, world, name) for r in range(world)]
    if not all(p.is_file() for p in parts):
        return None
    lock = outdir / f".{name}.lock"
    try:
        os.close(os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        log.info(f"another rank is merging the npz parts (delete {lock} if no rank is running)")
        return None
    try:
        loaded = [dict(np.load(p)) for p in parts]
        merged = {k: np.concatenate([part[k] for part in loaded]) for k in loaded[0]}
        order = {int(s): i for i, s in enumerate(merged["seeds"])}
        index = np.array([order[int(s)] for s in seeds])
        out = outdir / name
        save_npz(out, **{k: v[index] for k, v in merged.items()})
        for p in parts:
            p.unlink(missing_ok=True)
        return out
    finally:
        lock.unlink(missing_ok=True)
