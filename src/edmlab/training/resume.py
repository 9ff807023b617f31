"""Finding the checkpoint to resume from and refusing one that does not fit this run."""

from __future__ import annotations

import logging
import os
import zipfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["resolve_ckpt_path", "read_metadata", "check_compatible", "IncompatibleCheckpoint", "CKPT_NAME",
           "load_ema_denoiser", "config_changes", "BREAKING_KEYS", "load_training_checkpoint"]

log = logging.getLogger(__name__)

CKPT_NAME = "last.ckpt"


class IncompatibleCheckpoint(ValueError):
    """The checkpoint was written by a run with a different network, preconditioning or tensor shapes."""


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


def load_training_checkpoint(path: str | os.PathLike, verify: bool = False) -> dict[str, Any]:
    """A last.ckpt of `python train.py`, memory-mapped; else IncompatibleCheckpoint saying what the file is.

    `verify` checks the weights against the content hash stored at save time (reads every tensor)."""
    from edmlab.interop import FORMAT, CheckpointFormatError, verify_hash

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
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("edmlab"), dict):
        raise IncompatibleCheckpoint(f"ckpt_path={path} has no 'edmlab' entry: not written by edmlab's training; "
                                     f"{resume}")
    if verify:
        try:
            verify_hash(ckpt.get("state_dict", {}), ckpt["edmlab"].get("sha256"), str(path))
        except CheckpointFormatError as e:
            raise IncompatibleCheckpoint(f"cannot resume: {e}".replace("verify=False (sample.py verify_hash=false)",
                                                                      "verify_checkpoint=false")) from None
    return ckpt


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """checkpoint["edmlab"] without loading the tensors into memory (memory-mapped)."""
    return load_training_checkpoint(path)["edmlab"]


def _diff(a: dict, b: dict) -> list[str]:
    keys = sorted(set(a) | set(b))
    missing = object()
    return [f"{k}: checkpoint {a.get(k, '<absent>')!r} vs this run {b.get(k, '<absent>')!r}"
            for k in keys if a.get(k, missing) != b.get(k, missing)]


def check_compatible(checkpoint: dict[str, Any], module: torch.nn.Module) -> None:
    """Raise IncompatibleCheckpoint naming what differs: network config, preconditioning, tensor shapes."""
    meta = checkpoint.get("edmlab", {})
    problems: list[str] = []
    own = module.edmlab_metadata()
    if meta.get("network") and own["network"]:
        problems += [f"network.{d}" for d in _diff(meta["network"], own["network"])]
    if meta.get("precond"):
        problems += [f"precond.{d}" for d in _diff(meta["precond"], own["precond"])]
    state = checkpoint.get("state_dict", {})
    mine = module.state_dict()
    missing = sorted(set(mine) - set(state))
    unexpected = sorted(set(state) - set(mine))
    shapes = [f"tensor {k}: checkpoint {tuple(state[k].shape)} vs this run {tuple(v.shape)}"
              for k, v in mine.items() if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing:
        problems.append(f"tensors missing from the checkpoint: {', '.join(missing[:5])}"
                        + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""))
    if unexpected:
        problems.append(f"tensors in the checkpoint that this network lacks: {', '.join(unexpected[:5])}"
                        + (f" (+{len(unexpected) - 5} more)" if len(unexpected) > 5 else ""))
    problems += shapes[:10]
    if problems:
        raise IncompatibleCheckpoint(
            "cannot resume: the checkpoint was trained with a different network/preconditioning.\n  "
            + "\n  ".join(problems)
            + "\nResume with the same network/precond config as the original run (see its "
              ".hydra/config.yaml), or drop ckpt_path to start a fresh run.")


# Changing these mid-run makes a different run: refused on resume. Everything else (optim.*, durations, intervals,
# EMA and LR schedule settings) is applied and logged; IGNORED_KEYS say where the run happens, not what it is.
BREAKING_KEYS = ("network", "precond", "data.batch_size", "model.batch_size", "model.augment_pipe",
                 "model.phema_sigma_rels", "model.data_shape")
IGNORED_KEYS = ("paths", "hydra", "ckpt_path", "logger", "extras", "tags", "task_name", "model.optimizer",
                "callbacks.sample_grid.sampler", "trainer.devices", "trainer.num_nodes", "trainer.accelerator",
                "trainer.strategy", "trainer.plugins", "data.num_workers", "data.root", "data.path")


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict) and node:
        return {k: v for key, value in node.items() for k, v in _flatten(value, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): node}


def _under(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith((f"{p}.", f"{p}[")) for p in prefixes)


def config_changes(stored: dict[str, Any], current: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(breaking, applied): "key: checkpoint X vs this run Y" for each setting that differs."""
    old, new, missing = _flatten(stored), _flatten(current), object()
    breaking, applied = [], []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, missing), new.get(key, missing)
        if a == b or _under(key, IGNORED_KEYS):
            continue
        text = f"{key}: checkpoint {'<absent>' if a is missing else repr(a)} vs this run " \
               f"{'<absent>' if b is missing else repr(b)}"
        (breaking if _under(key, BREAKING_KEYS) else applied).append(text)
    return breaking, applied


def load_ema_denoiser(path: str | os.PathLike, map_location: Any = "cpu") -> torch.nn.Module:
    """The EMA denoiser of a training checkpoint (last.ckpt), rebuilt without Lightning, in eval mode."""
    from edmlab.generate import load_denoiser_any

    return load_denoiser_any(path, use_ema=True, map_location=map_location)
