"""Sampling precision: the network's convolutions and matmuls under bf16 autocast, the solver's state as it was."""

from __future__ import annotations

import torch

from edmlab.generation.batches import Sampler

__all__ = ["PRECISIONS", "autocast_dtype", "with_precision"]

PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16}


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a `precision` name (None: fp32, no autocast); an unknown name names the choices."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: use one of {' | '.join(PRECISIONS)}")
    return PRECISIONS[precision]


def with_precision(sampler: Sampler, device: torch.device | str, precision: str = "fp32") -> Sampler:
    """`sampler` run under autocast to `precision` on `device`; fp32 returns `sampler` itself.

    Autocast lowers only matmul-class ops (convolutions, linear layers, attention) and keeps normalizations in
    float32; the preconditioning's scalings and every solver update are elementwise, so D(x; sigma), the
    solver's state (float64 in EDM's solvers) and the samples keep their dtypes: only the network rounds.
    """
    dtype = autocast_dtype(precision)
    if dtype is None:
        return sampler

    def autocast_sampler(*args, **kwargs) -> torch.Tensor:
        with torch.autocast(torch.device(device).type, dtype=dtype):
            return sampler(*args, **kwargs)

    return autocast_sampler
