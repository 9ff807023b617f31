"""Where generated images go: per-seed PNGs (EDM's layout), one npz per seed range, the settings manifest.

Every file is written atomically, so a killed run never leaves a truncated image under its final name;
the manifest refuses a resume with other settings (skipped seeds would not match).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edmlab.fileio import atomic_write

__all__ = ["MANIFEST", "to_uint8_nhwc", "png_path", "save_png", "save_npz", "check_manifest", "remove_stale_tmp",
           "npz_name", "npz_part", "merge_npz_parts"]

log = logging.getLogger(__name__)

MANIFEST = "sample_settings.json"


def to_uint8_nhwc(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] images [N, C, H, W] -> uint8 [N, H, W, C]: clip(x * 127.5 + 128, 0, 255) truncated (EDM)."""
    return (images.float() * 127.5 + 128).clip(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


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
    with _atomic(path) as f:
        np.savez(f, **arrays)


def check_manifest(outdir: Path, settings: Mapping[str, Any] | None, rank: int) -> None:
    """Refuse to resume into a folder written with other settings (skipped seeds would not match)."""
    if settings is None:
        return
    path = outdir / MANIFEST
    settings = json.loads(json.dumps(settings, default=str))
    if path.is_file():
        old = json.loads(path.read_text())
        diff = [f"{k}: {old.get(k)!r} there, {settings.get(k)!r} now" for k in sorted(set(old) | set(settings))
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
