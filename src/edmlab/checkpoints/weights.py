"""Weights in and out of any checkpoint kind: strict loads that name the offending tensor, content hashes,
configs stored as plain data (what `torch.load(weights_only=True)` accepts)."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edmlab.checkpoints.errors import CheckpointFormatError
from edmlab.networks import build

__all__ = ["load_weights", "build_checked", "check_weights", "content_hash", "verify_hash", "plain_config",
           "precond_kwargs"]


def load_weights(module: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Strict load by name; the error names the first missing or mismatching tensor (in module order)."""
    check_weights(module, state_dict, source)
    module.load_state_dict(dict(state_dict), strict=True)

def build_checked(network: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor], source: str,
                  prefix: str = "") -> nn.Module:
    """`edmlab.networks.build(**network)` once the tensors under `prefix` fit it, checked on the meta device:
    a file declaring a huge network is refused before any memory is allocated for it."""
    with torch.device("meta"):
        probe = build(**network)
    check_weights(probe, {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}, source, prefix)
    return build(**network)

def check_weights(module: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str = "checkpoint",
                  prefix: str = "") -> None:
    """Raise CheckpointFormatError naming (with `prefix`) the first tensor missing, of another shape, or unexpected."""
    expected = module.state_dict()
    for name, tensor in expected.items():
        if name not in state_dict:
            raise CheckpointFormatError(f"{source}: tensor {prefix + name!r} of the network is missing from the "
                                        f"checkpoint ({len(state_dict)} tensors given, {len(expected)} expected)")
        given = state_dict[name]
        if tuple(given.shape) != tuple(tensor.shape):
            raise CheckpointFormatError(f"{source}: tensor {prefix + name!r} has shape {tuple(given.shape)} in the "
                                        f"checkpoint but {tuple(tensor.shape)} in the network built from its config")
    unexpected = [prefix + name for name in state_dict if name not in expected]
    if unexpected:
        raise CheckpointFormatError(f"{source}: the checkpoint has tensors the network does not: "
                                    f"{', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}")

def content_hash(state_dict: Mapping[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes (sorted by name): catches silent bit flips."""

    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()

def verify_hash(state_dict: Mapping[str, torch.Tensor], expected: str | None, source: str) -> None:
    """Raise CheckpointFormatError when the tensors do not hash to `expected` (None: file without a hash)."""
    if expected is not None and content_hash(state_dict) != expected:
        raise CheckpointFormatError(f"{source}: the tensors do not match the content hash stored at save time: the "
                                    "file is corrupted (disk or transfer bit flips); use another copy, or pass "
                                    "verify=False (sample.py verify_hash=false) to load it anyway")

def plain_config(value: Any, where: str = "config") -> Any:
    """A resolved config as plain dict/list/scalars (what `torch.load(weights_only=True)` accepts)."""
    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(value):
            value = OmegaConf.to_container(value, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a dependency; plain dicts need no conversion
        pass
    if isinstance(value, Mapping):
        return {str(k): plain_config(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain_config(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if value is None or isinstance(value, str | bool | int | float | torch.Tensor):
        return value
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{where}: cannot store a {type(value).__name__} in an edmlab checkpoint; "
                    "use plain dicts, lists, strings and numbers")


def precond_kwargs(meta: Mapping[str, Any]) -> dict[str, Any]:
    """The `Denoiser(net, **kwargs)` keywords stored under `meta["precond"]` of any edmlab file.

    Files written before the registry key was `name` store the Table 1 row under `kind`; both read the same."""
    kwargs = dict(meta["precond"])
    if "kind" in kwargs:
        kwargs["name"] = kwargs.pop("kind")
    return kwargs
