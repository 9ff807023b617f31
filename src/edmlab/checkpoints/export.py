"""edmlab's inference checkpoint (`last_ema.pt`, `save_denoiser`): `torch.save` of a plain dict (format, version,
network build kwargs, precond, config, global_step, state_dict, sha256), readable with `weights_only=True`."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any

import torch

from edmlab.checkpoints.errors import CheckpointFormatError
from edmlab.checkpoints.weights import (
    build_checked,
    content_hash,
    load_weights,
    plain_config,
    precond_kwargs,
    verify_hash,
)
from edmlab.fileio import atomic_torch_save
from edmlab.precond import Denoiser

__all__ = ["FORMAT", "VERSION", "save_denoiser", "load_denoiser", "is_pickle"]

FORMAT, VERSION = "edmlab-denoiser", 1


def save_denoiser(denoiser: Denoiser, path: str | os.PathLike, config: Any = None,
                  global_step: int | None = None) -> Path:
    """Write edmlab's inference checkpoint atomically; `global_step` records the training step it comes from."""

    build_config = denoiser.network_config
    if build_config is None:
        raise ValueError("denoiser.net has no build_config: build networks with edmlab.networks.build so "
                         "the checkpoint can rebuild them")
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "network": plain_config(build_config, "network"),
        "precond": {"name": denoiser.precond.name, **plain_config(denoiser.precond_params, "precond")},
        "config": plain_config(config),
        "global_step": None if global_step is None else int(global_step),
        "state_dict": {k: v.detach().cpu() for k, v in denoiser.state_dict().items()},
    }
    payload["sha256"] = content_hash(payload["state_dict"])
    return atomic_torch_save(payload, path)


def is_pickle(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(1) == b"\x80"


def load_denoiser(path: str | os.PathLike, map_location: Any = "cpu", verify: bool = True) -> Denoiser:
    """Read an edmlab inference checkpoint (weights_only) and rebuild its Denoiser, in eval mode.

    `verify` checks the tensors against the content hash stored at save time (skip it for speed)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    if not zipfile.is_zipfile(path):
        hint = (" It is a pickle: official EDM snapshots (network-snapshot-*.pkl) load with "
                "edmlab.checkpoints.load_edm_pickle." if is_pickle(path) else "")
        raise CheckpointFormatError(f"{path} is not an edmlab checkpoint (expected a torch.save archive with "
                                    f"format {FORMAT!r}).{hint}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        raise CheckpointFormatError(f"{path} is not an edmlab checkpoint: torch.load(weights_only=True) "
                                    f"refused it ({err})") from err
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        found = f"keys {sorted(map(str, ckpt))[:8]}" if isinstance(ckpt, dict) else f"a {type(ckpt).__name__}"
        lightning = isinstance(ckpt, dict) and "pytorch-lightning_version" in ckpt
        hint = (" It looks like a Lightning training checkpoint: its EMA denoiser loads with "
                "edmlab.checkpoints.load_any (or sample.py ckpt=...)." if lightning else "")
        raise CheckpointFormatError(f"{path} is not an edmlab checkpoint: expected a dict with format={FORMAT!r}, "
                                    f"found {found}.{hint}")
    if ckpt.get("version") != VERSION:
        raise CheckpointFormatError(f"{path}: edmlab checkpoint version {ckpt.get('version')!r} is not supported "
                                    f"(this edmlab reads version {VERSION})")
    if verify:
        verify_hash(ckpt["state_dict"], ckpt.get("sha256"), str(path))
    network, precond = dict(ckpt["network"]), precond_kwargs(ckpt)
    denoiser = Denoiser(build_checked(network, ckpt["state_dict"], str(path), prefix="net."), **precond)
    load_weights(denoiser, ckpt["state_dict"], source=str(path))
    return denoiser.to(map_location if isinstance(map_location, str | torch.device) else "cpu").eval()
