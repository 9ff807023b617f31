"""Seeds: the one seed-list parser, the split over ranks, and the per-seed random draws (`SeedGenerator`).

Image k depends only on seed k and the settings: one `torch.Generator(seed)` per image draws, in this
order, the latents, the class label (conditional networks always draw it, as EDM does) and then every
noise draw of the sampler. Batches are consecutive chunks of the seed list and rank r of W takes every
W-th batch, so a batch holds the same seeds whatever the number of processes.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Sequence

import torch

__all__ = ["ClassLabels", "SeedGenerator", "parse_seeds", "batches_for_rank", "draw_labels"]

# "random", "all" (seed mod label_dim), one class for every seed, or one class per seed (in seed order).
ClassLabels = int | str | Sequence[int] | None

_SEEDS_HELP = "e.g. 0-49999, or 0-9,20,30-31 (sample.py: seeds=[0-9,20,30-31])"


def parse_seeds(spec: int | str | Sequence[int | str]) -> list[int]:
    """Seeds from "0-49999", "0-9,20,30-31", an int, or a list of ints and "a-b" ranges (ranges inclusive)."""
    parts: list[int | str]
    if isinstance(spec, bool):
        raise ValueError(f"seeds: expected non-negative integers and inclusive ranges, got {spec!r}; {_SEEDS_HELP}")
    if isinstance(spec, int):
        parts = [spec]
    elif isinstance(spec, str):
        parts = [p for p in spec.replace(" ", "").split(",") if p]
    else:
        parts = list(spec)
    seeds: list[int] = []
    for part in parts:
        text = str(part).strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", text)
        if not m:
            raise ValueError(f"seeds: cannot read {text!r}; use non-negative integers and inclusive ranges, "
                             f"{_SEEDS_HELP}")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if hi < lo:
            raise ValueError(f"seeds: range {text!r} is empty; write it low-high, e.g. {hi}-{lo}")
        seeds.extend(range(lo, hi + 1))
    if not seeds:
        raise ValueError(f"seeds: {spec!r} names no seed; {_SEEDS_HELP}")
    if len(set(seeds)) != len(seeds):
        seen: set[int] = set()
        dup = next(s for s in seeds if s in seen or seen.add(s))
        raise ValueError(f"seeds: seed {dup} appears more than once in {spec!r}; list every seed once")
    return seeds


def batches_for_rank(seeds: Sequence[int], batch_size: int, rank: int = 0, world_size: int = 1) -> list[list[int]]:
    """Consecutive chunks of `batch_size` seeds; rank r of W takes chunks r, r+W, r+2W, ..."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    chunks = [list(seeds[i:i + batch_size]) for i in range(0, len(seeds), batch_size)]
    return chunks[rank::world_size]


class SeedGenerator:
    """One generator per seed (seed mod 2^32, EDM2's StackedRandomGenerator): item i draws only from seed i.

    `generators` is the list the samplers take (`generator=`) for their per-item noise.
    """

    def __init__(self, seeds: Sequence[int], device: torch.device | str = "cpu") -> None:
        self.seeds = [int(s) for s in seeds]
        self.device = torch.device(device)
        self.generators = [torch.Generator(device=self.device).manual_seed(s % (1 << 32)) for s in self.seeds]

    def __len__(self) -> int:
        return len(self.seeds)

    def randn(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Standard normal [N, *shape]; row i from seed i's generator."""
        return torch.stack([torch.randn(tuple(shape), generator=g, device=self.device, dtype=dtype)
                            for g in self.generators])

    def randint(self, high: int) -> torch.Tensor:
        """Integers [N] in [0, high); entry i from seed i's generator."""
        return torch.stack([torch.randint(high, (), generator=g, device=self.device) for g in self.generators])


def draw_labels(rng: SeedGenerator, label_dim: int, class_labels: ClassLabels) -> torch.Tensor | None:
    """Class indices [N] (None for unconditional networks) for `class_labels` (see ClassLabels).

    Conditional networks always draw the random class (after the latents), as EDM does, so fixing the
    class leaves the sampler's noise stream, hence the image up to its class, unchanged.
    """
    mode = "random" if class_labels is None else class_labels
    if label_dim == 0:
        if mode != "random":
            raise ValueError(f"class_labels={class_labels!r}, but the network is unconditional (label_dim=0); "
                             "use class_labels=random (or null)")
        return None
    drawn = rng.randint(label_dim)
    if mode == "random":
        return drawn
    if mode == "all":
        return torch.tensor([s % label_dim for s in rng.seeds], device=rng.device)
    if isinstance(mode, str) and not mode.lstrip("-").isdigit():
        raise ValueError(f"class_labels={class_labels!r}: use a class index, 'random', 'all' or one class per seed")
    per_seed = list(mode) if isinstance(mode, Sequence) and not isinstance(mode, str) else [mode] * len(rng)
    if len(per_seed) != len(rng):
        raise ValueError(f"class_labels: {len(per_seed)} classes for {len(rng)} seeds; give one class per seed")
    return torch.tensor([_class_index(k, label_dim) for k in per_seed], device=rng.device)


def _class_index(k: object, label_dim: int) -> int:
    """k as a class of a network with label_dim classes, or an error that names the valid range."""
    try:
        index = None if isinstance(k, bool) else int(k) if isinstance(k, str) else operator.index(k)
    except (TypeError, ValueError):
        index = None
    if index is None or not 0 <= index < label_dim:
        raise ValueError(f"class_labels={k!r} is not a class of this network (0 .. {label_dim - 1})")
    return index
