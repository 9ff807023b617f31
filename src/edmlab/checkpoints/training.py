"""edmlab's training checkpoint (`last.ckpt`): Lightning's dict plus `checkpoint["edmlab"]`, which rebuilds the
EMA (or raw) denoiser without Lightning. Read memory-mapped and `weights_only`; never unpickles code."""

from __future__ import annotations

import os
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from edmlab.checkpoints.errors import CheckpointFormatError, IncompatibleCheckpoint
from edmlab.checkpoints.export import FORMAT
from edmlab.checkpoints.weights import build_checked, load_weights, precond_kwargs, verify_hash
from edmlab.precond import Denoiser

__all__ = ["CKPT_DIR", "CKPT_NAME", "EXPORT_NAME", "CHECKPOINT_KEY", "EMA_PREFIX", "RAW_PREFIX", "META_FORMAT",
           "META_VERSION", "check_metadata", "load_training_checkpoint", "read_metadata", "saved_step",
           "denoiser_from_training"]

CKPT_DIR = "checkpoints"           # the folder of a run that holds its checkpoints
CKPT_NAME = "last.ckpt"            # the training state, in <run>/checkpoints/
EXPORT_NAME = "last_ema.pt"        # the EMA denoiser in edmlab's inference format, next to last.ckpt
CHECKPOINT_KEY = "edmlab"          # checkpoint[CHECKPOINT_KEY]: rebuilds the EMA denoiser without Lightning
EMA_PREFIX = "ema.module."         # prefix of the EMA denoiser's weights in checkpoint["state_dict"]
RAW_PREFIX = "denoiser."           # prefix of the trained (raw) weights
META_FORMAT, META_VERSION = "edmlab-lightning", 1


def check_metadata(meta: Mapping[str, Any], path: str | os.PathLike) -> str | None:
    """Why this edmlab cannot read checkpoint[CHECKPOINT_KEY] of `path` (another format, a newer version), else None.

    Files written before the entry carried `format`/`version` have neither and are read as version 1."""
    fmt, version = meta.get("format", META_FORMAT), meta.get("version", META_VERSION)
    if fmt == META_FORMAT and isinstance(version, int) and version <= META_VERSION:
        return None
    return (f"{path}: checkpoint[{CHECKPOINT_KEY!r}] is format {fmt!r} version {version!r}, but this edmlab reads "
            f"format {META_FORMAT!r} up to version {META_VERSION}; use the edmlab that wrote it (or a newer one)")


def load_training_checkpoint(path: str | os.PathLike, verify: bool = False) -> dict[str, Any]:
    """A last.ckpt of `python train.py`, memory-mapped; else IncompatibleCheckpoint saying what the file is.

    `verify` checks the weights against the content hash stored at save time (reads every tensor)."""
    path = Path(path)
    resume = "resume from a checkpoints/last.ckpt (or a run folder) of `python train.py`"
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            pickled = f.read(1) == b"\x80"
        what = ("a pickle: an official EDM network-snapshot-*.pkl is for sampling (sample.py ckpt=...), not for "
                "resuming" if pickled else "neither a torch.save archive nor a pickle")
        raise IncompatibleCheckpoint(f"ckpt_path={path} is not a training checkpoint: it is {what}; {resume}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - torch's advice (weights_only=False) would run code from the file
        raise IncompatibleCheckpoint(f"ckpt_path={path} is not a readable training checkpoint ({type(e).__name__}: "
                                     "it holds more than tensors and plain containers, or is damaged); edmlab "
                                     f"never unpickles code; {resume}") from None
    if isinstance(ckpt, dict) and ckpt.get("format") == FORMAT:
        raise IncompatibleCheckpoint(f"ckpt_path={path} is an inference export (EMA weights only: no optimizer, "
                                     f"data or RNG state); {resume}, e.g. the last.ckpt beside it")
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get(CHECKPOINT_KEY), dict):
        raise IncompatibleCheckpoint(f"ckpt_path={path} has no {CHECKPOINT_KEY!r} entry: not written by edmlab's "
                                     f"training; {resume}")
    problem = check_metadata(ckpt[CHECKPOINT_KEY], path)
    if problem is not None:
        raise IncompatibleCheckpoint(f"cannot resume: {problem}")
    if verify:
        try:
            verify_hash(ckpt.get("state_dict", {}), ckpt[CHECKPOINT_KEY].get("sha256"), str(path))
        except CheckpointFormatError as e:
            raise IncompatibleCheckpoint(f"cannot resume: {e}".replace("verify=False (sample.py verify_hash=false)",
                                                                      "verify_checkpoint=false")) from None
    return ckpt


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """checkpoint[CHECKPOINT_KEY] without loading the tensors into memory (memory-mapped)."""
    return load_training_checkpoint(path)[CHECKPOINT_KEY]


def saved_step(path: str | os.PathLike) -> int | None:
    """The `global_step` recorded in a last.ckpt or an export (None: absent or unreadable)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - missing, truncated or foreign: not a usable step
        return None
    step = ckpt.get("global_step") if isinstance(ckpt, dict) else None
    return int(step) if isinstance(step, int) else None


def denoiser_from_training(path: Path, ckpt: dict, use_ema: bool, map_location: Any,
                              verify: bool = True) -> Denoiser:
    """The EMA (or raw) denoiser of an edmlab Lightning checkpoint, rebuilt from checkpoint['edmlab']."""
    meta = ckpt[CHECKPOINT_KEY]
    problem = check_metadata(meta, path)
    if problem is not None:
        raise CheckpointFormatError(problem)
    if verify:
        verify_hash(ckpt.get("state_dict", {}), meta.get("sha256"), str(path))
    if not meta.get("network"):
        raise CheckpointFormatError(f"{path}: checkpoint[{CHECKPOINT_KEY!r}] has no 'network' build config; the "
                                    "network was not built with edmlab.networks.build, so it cannot be rebuilt")
    prefix = meta.get("ema_prefix", EMA_PREFIX) if use_ema else RAW_PREFIX
    state = {k[len(prefix):]: v for k, v in ckpt.get("state_dict", {}).items() if k.startswith(prefix)}
    if not state:
        raise CheckpointFormatError(f"{path}: no weights under {prefix!r} in state_dict "
                                    f"({'EMA' if use_ema else 'raw'} weights requested by use_ema={use_ema})")
    denoiser = Denoiser(build_checked(dict(meta["network"]), state, str(path), prefix="net."), **precond_kwargs(meta),
                        data_shape=meta.get("data_shape") or None)
    load_weights(denoiser, state, source=f"{path} ({'EMA' if use_ema else 'raw'} weights)")
    return denoiser.to(map_location).eval()
