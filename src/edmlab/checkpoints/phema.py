"""Post-hoc EMA snapshots (`phema-*.pt`, EDM2 Sec. 3.2): the one writer and the one reader of the format.

A snapshot is a weights_only-loadable dict: format, version, nimg (images seen), sigma_rels, state_dicts
(one EMA denoiser per sigma_rel) and what rebuilds the denoiser (network build kwargs, preconditioning,
config). `edmlab.training.phema.reconstruct` combines them into any other sigma_rel.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edmlab.checkpoints.errors import CheckpointFormatError
from edmlab.checkpoints.weights import plain_config
from edmlab.fileio import atomic_torch_save

__all__ = ["PHEMA_FORMAT", "PHEMA_VERSION", "save_snapshot", "load_snapshot", "SnapshotInfo", "list_snapshots"]

PHEMA_FORMAT, PHEMA_VERSION = "edmlab-phema", 1


def save_snapshot(path: str | os.PathLike, phema: Any, nimg: int, denoiser: nn.Module,
                  config: Any = None) -> Path:
    """Write every tracked profile of `phema` at training time `nimg` (images seen) atomically."""
    payload = {
        "format": PHEMA_FORMAT, "version": PHEMA_VERSION, "nimg": int(nimg),
        "sigma_rels": list(phema.sigma_rels),
        "state_dicts": [{k: v.detach().cpu() for k, v in ema.state_dict().items()} for ema in phema.emas],
        "network": plain_config(dict(denoiser.network_config or {}), "network"),
        "precond": {"name": denoiser.precond.name, **plain_config(denoiser.precond_params, "precond")},
        "config": plain_config(config),
    }
    return atomic_torch_save(payload, path)


@dataclass(frozen=True)
class SnapshotInfo:
    """One stored profile: file, training time in images, relative std, index inside the file."""

    path: Path
    nimg: int
    sigma_rel: float
    index: int


def load_snapshot(path: Path) -> dict:
    """A snapshot file, checked for its format and version (memory-mapped, weights_only)."""
    snap = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if not isinstance(snap, dict) or snap.get("format") != PHEMA_FORMAT:
        raise CheckpointFormatError(f"{path} is not a post-hoc EMA snapshot (expected format {PHEMA_FORMAT!r}, "
                                    "written by training with model.phema_sigma_rels set)")
    if snap.get("version") != PHEMA_VERSION:
        raise CheckpointFormatError(f"{path}: post-hoc EMA snapshot version {snap.get('version')!r} is not "
                                    f"supported (this edmlab reads version {PHEMA_VERSION})")
    return snap


def list_snapshots(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> list[SnapshotInfo]:
    """Every profile in the given snapshot files or folders (phema-*.pt), sorted by (nimg, sigma_rel)."""
    paths = [paths] if isinstance(paths, str | os.PathLike) else list(paths)
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(p.glob("phema-*.pt"))
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"no post-hoc EMA snapshot file or folder at {p}")
    if not files:
        raise FileNotFoundError(f"no phema-*.pt snapshots in {', '.join(map(str, paths))}; train with "
                                "model.phema_sigma_rels=[0.05,0.10] to write them")
    out = []
    for f in files:
        snap = load_snapshot(f)
        out += [SnapshotInfo(f, int(snap["nimg"]), float(s), i) for i, s in enumerate(snap["sigma_rels"])]
    unique = {(s.nimg, s.sigma_rel): s for s in out}  # the same profile saved twice (snapshot + checkpoint)
    return sorted(unique.values(), key=lambda s: (s.nimg, s.sigma_rel))
