"""Random-number-generator states of one process (torch CPU/CUDA, numpy, python) as checkpointable values.

States are stored as tensors and plain lists so that a checkpoint holding them
still loads with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

__all__ = ["get_state", "set_state", "seed_all", "derive_seed"]


def get_state() -> dict[str, Any]:
    """The global RNG states of this process."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, mt, gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": int(version), "state": list(mt), "gauss": gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # the current device only: one process, one GPU
    return state


def set_state(state: dict[str, Any]) -> None:
    """Restore states produced by `get_state` (the CUDA part only where CUDA is in use)."""
    torch.set_rng_state(state["torch"].cpu())
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu())


def derive_seed(*entropy: int) -> int:
    """A 31-bit seed that is a fixed function of the given integers (e.g. base seed, rank, step)."""
    return int(np.random.SeedSequence([int(e) for e in entropy]).generate_state(1)[0] & 0x7FFFFFFF)


def seed_all(seed: int) -> None:
    """Seed torch (CPU and CUDA), numpy and python's `random`."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
