"""The one checkpoint resolver and the one loader: what a user names (a file, a run folder, `last`) becomes a
file, and any checkpoint kind becomes a Denoiser, told apart by content (never by file name)."""

from __future__ import annotations

import logging
import os
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from edmlab.checkpoints import edm, export
from edmlab.checkpoints.errors import CheckpointFormatError, UnsafePickleError
from edmlab.checkpoints.training import CHECKPOINT_KEY, CKPT_NAME, denoiser_from_training
from edmlab.precond import Denoiser

__all__ = ["ACCEPTED_KINDS", "resolve_checkpoint", "resolve_ckpt_path", "load_denoiser_any"]

log = logging.getLogger(__name__)

ACCEPTED_KINDS = ("an edmlab inference checkpoint (edmlab.checkpoints.save_denoiser, e.g. checkpoints/last_ema.pt)",
                  "an edmlab Lightning training checkpoint (checkpoints/last.ckpt of `python train.py`)",
                  "an official NVlabs/edm snapshot pickle (network-snapshot-*.pkl)")


def _run_checkpoint(run_dir: Path) -> Path | None:
    for candidate in (run_dir / "checkpoints" / CKPT_NAME, run_dir / CKPT_NAME):
        if candidate.is_file():
            return candidate
    return None


def resolve_ckpt_path(ckpt_path: str | os.PathLike | None, runs_dir: str | os.PathLike,
                      output_dir: str | os.PathLike, own_only: bool = False) -> Path | None:
    """`ckpt_path` as a file: "last" = this run folder's own last.ckpt (a requeued job) or else (unless
    `own_only`) the newest last.ckpt under `runs_dir`; a folder = that run's checkpoints/last.ckpt; a file = itself."""
    if ckpt_path is None or str(ckpt_path) == "":
        return None
    if str(ckpt_path) == "last":
        own = _run_checkpoint(Path(output_dir))
        if own is not None or own_only:
            return own
        runs = Path(runs_dir)
        found = [p for p in runs.glob(f"*/checkpoints/{CKPT_NAME}") if p.is_file()] if runs.is_dir() else []
        if not found:
            log.warning(f"ckpt_path=last: no {CKPT_NAME} under {runs}/*/checkpoints/; starting from scratch")
            return None
        return max(found, key=lambda p: p.stat().st_mtime)
    path = Path(ckpt_path).expanduser()
    if path.is_dir():
        found = _run_checkpoint(path)
        if found is None:
            raise FileNotFoundError(f"ckpt_path={ckpt_path}: folder has no checkpoints/{CKPT_NAME} "
                                    f"(nor {CKPT_NAME}); pass a run folder of `python train.py` or a "
                                    ".ckpt file")
        return found
    if not path.is_file():
        raise FileNotFoundError(f"ckpt_path={ckpt_path}: no such file or folder; use ckpt_path=last, "
                                f"a run folder or a .ckpt file")
    return path


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint file; a training run folder means its checkpoints/last.ckpt (else last_ema.pt)."""
    p = Path(path).expanduser()
    if p.is_dir():
        for candidate in ("checkpoints/last.ckpt", "last.ckpt", "checkpoints/last_ema.pt", "last_ema.pt"):
            if (p / candidate).is_file():
                return p / candidate
        raise FileNotFoundError(f"ckpt={path}: a folder without checkpoints/last.ckpt or last_ema.pt; pass a "
                                "checkpoint file or a run folder of `python train.py`")
    if not p.is_file():
        raise FileNotFoundError(f"ckpt={path}: no such file")
    return p


def _wrong_kind(path: Path, found: str) -> ValueError:
    kinds = "\n  - ".join(ACCEPTED_KINDS)
    return CheckpointFormatError(f"{path} is not a checkpoint edmlab can sample from: {found}.\n"
                                 f"Accepted kinds:\n  - {kinds}")


def load_denoiser_any(path: str | os.PathLike, use_ema: bool = True, map_location: Any = "cpu",
                      verify: bool = True) -> Denoiser:
    """A Denoiser from any accepted checkpoint kind, told apart by content (never by file name).

    Reads (a) edmlab inference checkpoints, (b) edmlab Lightning training checkpoints, EMA weights by
    default, and (c) official EDM snapshot pickles, through safe loaders only (weights_only / allowlist).
    """
    path = resolve_checkpoint(path)
    if zipfile.is_zipfile(path):
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as err:  # noqa: BLE001 - any refusal means the same to the user
            raise _wrong_kind(path, f"torch.load(weights_only=True) refused it ({type(err).__name__}: "
                                    f"{str(err).splitlines()[0] if str(err) else ''}); edmlab never unpickles code "
                                    "from a checkpoint") from err
        if isinstance(ckpt, dict) and ckpt.get("format") == export.FORMAT:
            if not use_ema:
                raise ValueError(f"{path} is an exported inference checkpoint holding one set of weights; "
                                 "use_ema=false needs a training checkpoint (last.ckpt)")
            return export.load_denoiser(path, map_location=map_location, verify=verify)
        if isinstance(ckpt, dict) and isinstance(ckpt.get(CHECKPOINT_KEY), Mapping):
            return denoiser_from_training(path, ckpt, use_ema, map_location, verify)
        if isinstance(ckpt, dict) and "pytorch-lightning_version" in ckpt:
            raise _wrong_kind(path, "a Lightning checkpoint without the 'edmlab' entry (not written by "
                                    "edmlab's training)")
        found = f"a dict with keys {sorted(map(str, ckpt))[:8]}" if isinstance(ckpt, dict) else \
            f"a {type(ckpt).__name__}"
        raise _wrong_kind(path, f"torch.save archive holding {found}")
    with open(path, "rb") as f:
        magic = f.read(2)
    if magic[:1] != b"\x80":
        raise _wrong_kind(path, "neither a torch.save archive nor a pickle")
    if not use_ema:
        raise ValueError(f"{path} is an EDM snapshot, which holds only the EMA network; use_ema=false is not "
                         "available for it")
    try:
        return edm.load_edm_pickle(path).to(map_location)
    except (CheckpointFormatError, UnsafePickleError, pickle.UnpicklingError) as err:
        raise _wrong_kind(path, f"a pickle that is not an EDM network snapshot ({err})") from err
