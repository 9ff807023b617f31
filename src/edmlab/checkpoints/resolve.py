"""The one checkpoint resolver: what a user names (a file, a run folder, `last`) becomes a checkpoint file.

A run folder is searched in the order of `RUN_CANDIDATES`: the training state first (it holds both weight sets),
then the export beside it. `training=True` (resuming) accepts only the training state, `last.ckpt`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Literal, overload

from edmlab.checkpoints.training import CKPT_DIR, CKPT_NAME, EXPORT_NAME

__all__ = ["RUN_CANDIDATES", "resolve"]

log = logging.getLogger(__name__)

# Inside a run folder, first match wins.
RUN_CANDIDATES = (Path(CKPT_DIR, CKPT_NAME), Path(CKPT_NAME), Path(CKPT_DIR, EXPORT_NAME), Path(EXPORT_NAME))


def _in_run_folder(folder: Path, training: bool) -> Path | None:
    for candidate in RUN_CANDIDATES:
        if (not training or candidate.name == CKPT_NAME) and (folder / candidate).is_file():
            return folder / candidate
    return None


def _newest_run(runs_dir: Path) -> Path | None:
    found = [p for p in runs_dir.glob(f"*/{CKPT_DIR}/{CKPT_NAME}") if p.is_file()] if runs_dir.is_dir() else []
    if not found:
        log.warning(f"ckpt_path=last: no {CKPT_NAME} under {runs_dir}/*/{CKPT_DIR}/; starting from scratch")
        return None
    return max(found, key=lambda p: p.stat().st_mtime)


@overload
def resolve(path: str | os.PathLike, *, training: Literal[False] = False, runs_dir: str | os.PathLike | None = None,
            output_dir: str | os.PathLike | None = None, own_only: bool = False) -> Path: ...


@overload
def resolve(path: str | os.PathLike | None, *, training: bool, runs_dir: str | os.PathLike | None = None,
            output_dir: str | os.PathLike | None = None, own_only: bool = False) -> Path | None: ...


def resolve(path: str | os.PathLike | None, *, training: bool = False, runs_dir: str | os.PathLike | None = None,
            output_dir: str | os.PathLike | None = None, own_only: bool = False) -> Path | None:
    """The checkpoint file `path` names: a file is itself, a run folder its first file in `RUN_CANDIDATES`.

    With `training` (train.py's `ckpt_path`): only last.ckpt is accepted; None or "" mean a fresh run (None is
    returned); "last" means `output_dir`'s own last.ckpt (a requeued job) or else, unless `own_only`, the newest
    `runs_dir/*/checkpoints/last.ckpt` (None when there is none).
    """
    key = "ckpt_path" if training else "ckpt"
    if path is None or str(path) == "":
        if training:
            return None
        raise ValueError(f"{key} is not set: pass a checkpoint file or a run folder of `python train.py`")
    if training and str(path) == "last":
        own = _in_run_folder(Path(output_dir), training) if output_dir is not None else None
        if own is not None or own_only or runs_dir is None:
            return own
        return _newest_run(Path(runs_dir))
    p = Path(path).expanduser()
    if p.is_dir():
        found = _in_run_folder(p, training)
        if found is not None:
            return found
        if training:
            raise FileNotFoundError(f"{key}={path}: folder has no {CKPT_DIR}/{CKPT_NAME} (nor {CKPT_NAME}); pass a "
                                    "run folder of `python train.py` or a .ckpt file")
        raise FileNotFoundError(f"{key}={path}: a folder without {CKPT_DIR}/{CKPT_NAME} or {EXPORT_NAME}; pass a "
                                "checkpoint file or a run folder of `python train.py`")
    if not p.is_file():
        hint = "; use ckpt_path=last, a run folder or a .ckpt file" if training else ""
        raise FileNotFoundError(f"{key}={path}: no such file{' or folder' if training else ''}{hint}")
    return p
