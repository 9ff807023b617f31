"""The one loader: any checkpoint kind becomes a Denoiser, told apart by content (never by file name), together
with what was loaded, from which file and at which training step (`Loaded`)."""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from edmlab.checkpoints import edm, export
from edmlab.checkpoints.errors import CheckpointFormatError, UnsafePickleError
from edmlab.checkpoints.resolve import resolve
from edmlab.checkpoints.training import CHECKPOINT_KEY, denoiser_from_training
from edmlab.precond import Denoiser

__all__ = ["ACCEPTED_KINDS", "Kind", "Loaded", "load_any"]

ACCEPTED_KINDS = ("an edmlab inference checkpoint (edmlab.checkpoints.save_denoiser, e.g. checkpoints/last_ema.pt)",
                  "an edmlab Lightning training checkpoint (checkpoints/last.ckpt of `python train.py`)",
                  "an official NVlabs/edm or edm2 snapshot pickle (network-snapshot-*.pkl)")

Kind = Literal["export", "training", "edm-pickle", "edm2-pickle"]


@dataclass(frozen=True)
class Loaded:
    """A loaded denoiser and where it came from."""

    denoiser: Denoiser
    kind: Kind                      # export (last_ema.pt), training (last.ckpt), edm-pickle or edm2-pickle
    path: Path                      # the file read, after resolving a run folder
    step: int | None                # the training step it was saved at, when the file records it
    meta: Mapping[str, Any] = field(default_factory=dict)  # the file's metadata: config, sha256, snapshot settings


def _wrong_kind(path: Path, found: str) -> CheckpointFormatError:
    kinds = "\n  - ".join(ACCEPTED_KINDS)
    return CheckpointFormatError(f"{path} is not a checkpoint edmlab can sample from: {found}.\n"
                                 f"Accepted kinds:\n  - {kinds}")


def _step(ckpt: Mapping[str, Any]) -> int | None:
    step = ckpt.get("global_step")
    return int(step) if isinstance(step, int) else None


def _load_archive(path: Path, use_ema: bool, map_location: Any, verify: bool) -> Loaded:
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
        denoiser = export.load_denoiser(path, map_location=map_location, verify=verify)
        meta = {k: v for k, v in ckpt.items() if k != "state_dict"}
        return Loaded(denoiser, "export", path, _step(ckpt), meta)
    if isinstance(ckpt, dict) and isinstance(ckpt.get(CHECKPOINT_KEY), Mapping):
        denoiser = denoiser_from_training(path, ckpt, use_ema, map_location, verify)
        return Loaded(denoiser, "training", path, _step(ckpt), dict(ckpt[CHECKPOINT_KEY]))
    if isinstance(ckpt, dict) and "pytorch-lightning_version" in ckpt:
        raise _wrong_kind(path, f"a Lightning checkpoint without the {CHECKPOINT_KEY!r} entry (not written by "
                                "edmlab's training)")
    found = f"a dict with keys {sorted(map(str, ckpt))[:8]}" if isinstance(ckpt, dict) else f"a {type(ckpt).__name__}"
    raise _wrong_kind(path, f"torch.save archive holding {found}")


def _load_pickle(path: Path, use_ema: bool, map_location: Any) -> Loaded:
    with open(path, "rb") as f:
        magic = f.read(1)
    if magic != b"\x80":
        raise _wrong_kind(path, "neither a torch.save archive nor a pickle")
    if not use_ema:
        raise ValueError(f"{path} is an EDM snapshot, which holds only the EMA network; use_ema=false is not "
                         "available for it")
    try:
        snapshot = edm.read_edm_snapshot(path)
    except (CheckpointFormatError, UnsafePickleError, pickle.UnpicklingError) as err:
        raise _wrong_kind(path, f"a pickle that is not an EDM network snapshot ({err})") from err
    kind: Kind = "edm2-pickle" if snapshot.precond_class == "Precond" else "edm-pickle"
    return Loaded(snapshot.denoiser.to(map_location), kind, path, None, snapshot.metadata())


def load_any(path: str | os.PathLike, use_ema: bool = True, map_location: Any = "cpu", verify: bool = True) -> Loaded:
    """Any accepted checkpoint kind (a file or a run folder), read through safe loaders only (weights_only or the
    snapshot allowlist): the EMA denoiser by default, the raw one with `use_ema=False` (training checkpoints);
    `verify` checks the content hash stored at save time."""
    path = resolve(path)
    if zipfile.is_zipfile(path):
        return _load_archive(path, use_ema, map_location, verify)
    return _load_pickle(path, use_ema, map_location)
