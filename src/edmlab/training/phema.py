"""Post-hoc EMA snapshots (EDM2 Sec. 3.2): one file format, written during training and read to reconstruct.

A snapshot `phema-*.pt` is a weights_only-loadable dict: format, version, nimg (images seen), sigma_rels,
state_dicts (one EMA denoiser per sigma_rel) and what rebuilds the denoiser (network build kwargs,
preconditioning, config). `reconstruct` combines the snapshots' weights with EDM2's least-squares
coefficients (App. C.3, `posthoc_coefficients`) into an edmlab inference checkpoint for any sigma_rel,
reading one snapshot at a time so memory stays at two copies of the network.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edmlab.fileio import atomic_torch_save
from edmlab.training.ema import PowerFunctionEMA, posthoc_coefficients

__all__ = ["PHEMA_FORMAT", "PHEMA_VERSION", "save_snapshot", "SnapshotInfo", "list_snapshots", "reconstruct",
           "reconstruct_denoiser"]

PHEMA_FORMAT, PHEMA_VERSION = "edmlab-phema", 1


def save_snapshot(path: str | os.PathLike, phema: PowerFunctionEMA, nimg: int, denoiser: nn.Module,
                  config: Any = None) -> Path:
    """Write every tracked profile of `phema` at training time `nimg` (images seen) atomically."""
    from edmlab.interop import _plain_config

    payload = {
        "format": PHEMA_FORMAT, "version": PHEMA_VERSION, "nimg": int(nimg),
        "sigma_rels": list(phema.sigma_rels),
        "state_dicts": [{k: v.detach().cpu() for k, v in ema.state_dict().items()} for ema in phema.emas],
        "network": _plain_config(dict(getattr(denoiser.net, "build_config", {})), "network"),
        "precond": {"kind": denoiser.kind, **_plain_config(denoiser.precond_params, "precond")},
        "config": _plain_config(config),
    }
    return atomic_torch_save(payload, path)


@dataclass(frozen=True)
class SnapshotInfo:
    """One stored profile: file, training time in images, relative std, index inside the file."""

    path: Path
    nimg: int
    sigma_rel: float
    index: int


def _load(path: Path) -> dict:
    snap = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if not isinstance(snap, dict) or snap.get("format") != PHEMA_FORMAT:
        raise ValueError(f"{path} is not a post-hoc EMA snapshot (expected format {PHEMA_FORMAT!r}, written by "
                         "training with model.phema_sigma_rels set)")
    if snap.get("version") != PHEMA_VERSION:
        raise ValueError(f"{path}: post-hoc EMA snapshot version {snap.get('version')!r} is not supported "
                         f"(this edmlab reads version {PHEMA_VERSION})")
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
        snap = _load(f)
        out += [SnapshotInfo(f, int(snap["nimg"]), float(s), i) for i, s in enumerate(snap["sigma_rels"])]
    unique = {(s.nimg, s.sigma_rel): s for s in out}  # the same profile saved twice (snapshot + checkpoint)
    return sorted(unique.values(), key=lambda s: (s.nimg, s.sigma_rel))


def reconstruct(snapshots: Sequence[SnapshotInfo], sigma_rel: float,
                nimg: int | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict of the sigma_rel EMA at time nimg, snapshot metadata) as sum_i x_i theta_i (EDM2 eq. 8)."""
    nimg = max(s.nimg for s in snapshots) if nimg is None else int(nimg)
    if not any(s.nimg == nimg for s in snapshots):
        raise ValueError(f"nimg={nimg} is not the time of any snapshot; choose one of "
                         f"{sorted({s.nimg for s in snapshots})}")
    used = [s for s in snapshots if 0 < s.nimg <= nimg]  # later snapshots cannot describe an earlier average
    x = posthoc_coefficients([s.nimg for s in used], [s.sigma_rel for s in used], nimg, sigma_rel)
    acc: dict[str, torch.Tensor] = {}
    meta: dict = {}
    for path in sorted({s.path for s in used}):
        snap = _load(path)
        meta = meta or {k: snap[k] for k in ("network", "precond", "config")}
        for s, w in zip(used, x, strict=True):
            if s.path != path:
                continue
            for key, value in snap["state_dicts"][s.index].items():
                if not value.is_floating_point():
                    acc[key] = value.clone()
                else:  # float buffers are equal in every profile and the weights sum to 1: they stay put
                    acc[key] = acc.get(key, 0) + float(w) * value.double()
    dtypes = {k: v.dtype for k, v in _load(used[0].path)["state_dicts"][used[0].index].items()}
    return {k: v.to(dtypes[k]) for k, v in acc.items()}, meta


def reconstruct_denoiser(snapshots: Sequence[SnapshotInfo], sigma_rel: float, nimg: int | None = None):
    """The reconstructed EMA as a Denoiser (rebuilt from the snapshot's network and precond), in eval mode."""
    from edmlab.interop import load_weights
    from edmlab.networks import build
    from edmlab.precond import Denoiser

    state, meta = reconstruct(snapshots, sigma_rel, nimg)
    if not meta.get("network"):
        raise ValueError("the snapshots hold no network build config; they were not written by edmlab training")
    denoiser = Denoiser(build(**dict(meta["network"])), **dict(meta["precond"]))
    load_weights(denoiser, state, source="post-hoc EMA reconstruction")
    return denoiser.eval(), meta
