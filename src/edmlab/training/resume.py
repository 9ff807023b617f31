"""Resume policy: refuse a checkpoint that does not fit this run, apply and log the settings that may change.

Finding and reading the checkpoint is `edmlab.checkpoints` (`resolve`, `load_training_checkpoint`)."""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from edmlab.checkpoints.errors import IncompatibleCheckpoint
from edmlab.checkpoints.training import CHECKPOINT_KEY
from edmlab.checkpoints.weights import precond_kwargs

__all__ = ["check_resume", "check_compatible", "config_changes", "BREAKING_KEYS", "IGNORED_KEYS"]

log = logging.getLogger(__name__)


def check_resume(checkpoint: dict[str, Any], module: torch.nn.Module, run_config: dict[str, Any],
                 source: str | os.PathLike) -> None:
    """Refuse a checkpoint this run cannot continue (before Lightning opens it); log the settings applied anew.

    `checkpoint` comes memory-mapped from `load_training_checkpoint`: only its metadata and tensor shapes are
    read. Lightning's restore (`EDMModule.on_load_checkpoint`) does not repeat these checks."""
    check_compatible(checkpoint, module)
    breaking, applied = config_changes(checkpoint[CHECKPOINT_KEY].get("config") or {}, run_config)
    if breaking:
        raise IncompatibleCheckpoint(f"cannot resume {source}: {'; '.join(breaking)}. These change what "
                                     "is trained; set them back, or drop ckpt_path to start a fresh run")
    if applied:
        log.warning(f"resuming with changed settings, applied from now on: {'; '.join(applied)}")


def _diff(a: dict, b: dict) -> list[str]:
    keys = sorted(set(a) | set(b))
    missing = object()
    return [f"{k}: checkpoint {a.get(k, '<absent>')!r} vs this run {b.get(k, '<absent>')!r}"
            for k in keys if a.get(k, missing) != b.get(k, missing)]


def check_compatible(checkpoint: dict[str, Any], module: torch.nn.Module) -> None:
    """Raise IncompatibleCheckpoint naming what differs: network config, preconditioning, tensor shapes."""
    meta = checkpoint.get(CHECKPOINT_KEY, {})
    problems: list[str] = []
    own = module.edmlab_metadata()
    if meta.get("network") and own["network"]:
        problems += [f"network.{d}" for d in _diff(meta["network"], own["network"])]
    if meta.get("precond"):
        problems += [f"precond.{d}" for d in _diff(precond_kwargs(meta), own["precond"])]
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
# EMA and LR schedule settings) is applied and logged; IGNORED_KEYS say where the run happens, not what it is, or
# are compared where they are used: the shared constants (sigma_data, vp.*, ve.*) in precond.*, loss.*, process.*;
# iDDPM's output-channel factor in the network's own out_channels.
BREAKING_KEYS = ("network", "precond", "data.batch_size", "model.batch_size", "model.augment_pipe",
                 "model.phema_sigma_rels", "model.data_shape")
IGNORED_KEYS = ("paths", "hydra", "ckpt_path", "logger", "extras", "tags", "task_name", "model.optimizer",
                "callbacks.sample_grid.sampler", "trainer.devices", "trainer.num_nodes", "trainer.accelerator",
                "trainer.strategy", "trainer.plugins", "data.num_workers", "data.root", "data.path",
                "sigma_data", "vp", "ve", "precond.out_channels_per_image_channel")


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


