"""Seeds: parsing the user's seed list, splitting it over ranks, and the per-seed random draws.

Image k depends only on seed k and the settings: one `torch.Generator(seed)` per image draws, in this
order, the latents, the class label (for conditional networks, as EDM's StackedRandomGenerator) and then
every noise draw of the sampler. Batches are consecutive chunks of the seed list and rank r of W takes
every W-th batch, so a batch holds the same seeds whatever the number of processes.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

__all__ = ["ClassLabels", "parse_seeds", "batches_for_rank", "seed_generators", "draw_labels"]

ClassLabels = int | str | None


def parse_seeds(spec: int | str | Sequence[int | str]) -> list[int]:
    """Seeds from "0-49999", "0-9,20,30-31", an int, or a list of ints and "a-b" ranges (ranges inclusive)."""
    parts: list[int | str]
    if isinstance(spec, bool):
        raise ValueError(f"seeds: expected ranges like 0-49999 or a list, got {spec!r}")
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
                             "e.g. seeds=0-49999 or seeds=[0-9,20,30-31]")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if hi < lo:
            raise ValueError(f"seeds: range {text!r} is empty (write it low-high)")
        seeds.extend(range(lo, hi + 1))
    if not seeds:
        raise ValueError(f"seeds: {spec!r} names no seed")
    if len(set(seeds)) != len(seeds):
        dup = next(s for i, s in enumerate(seeds) if s in seeds[:i])
        raise ValueError(f"seeds: seed {dup} appears more than once in {spec!r}")
    return seeds


def batches_for_rank(seeds: Sequence[int], batch_size: int, rank: int = 0, world_size: int = 1) -> list[list[int]]:
    """Consecutive chunks of `batch_size` seeds; rank r of W takes chunks r, r+W, r+2W, ..."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    chunks = [list(seeds[i:i + batch_size]) for i in range(0, len(seeds), batch_size)]
    return chunks[rank::world_size]


def seed_generators(seeds: Sequence[int], device: torch.device | str = "cpu") -> list[torch.Generator]:
    """One generator per image, seeded with seed mod 2^32 (EDM's StackedRandomGenerator), on the run device."""
    return [torch.Generator(device=device).manual_seed(int(s) % (1 << 32)) for s in seeds]


def draw_labels(generators: Sequence[torch.Generator], seeds: Sequence[int], label_dim: int,
                class_labels: ClassLabels) -> torch.Tensor | None:
    """Class indices [N] (None for unconditional networks): random per seed, `all` = seed mod label_dim, or fixed.

    Conditional networks always draw the random class (after the latents), as EDM does, so fixing the
    class leaves the sampler's noise stream, hence the image up to its class, unchanged.
    """
    mode = "random" if class_labels is None else class_labels
    if label_dim == 0:
        if mode != "random":
            raise ValueError(f"class_labels={class_labels!r}, but the network is unconditional (label_dim=0); "
                             "use class_labels=random (or null)")
        return None
    device = generators[0].device
    drawn = torch.stack([torch.randint(label_dim, (), generator=g, device=device) for g in generators])
    if mode == "random":
        return drawn
    if mode == "all":
        return torch.tensor([s % label_dim for s in seeds], device=device)
    if isinstance(mode, str) and not mode.lstrip("-").isdigit():
        raise ValueError(f"class_labels={class_labels!r}: use a class index, 'random' or 'all'")
    k = int(mode)
    if not 0 <= k < label_dim:
        raise ValueError(f"class_labels={k} is not a class of this network (0 .. {label_dim - 1})")
    return torch.full((len(seeds),), k, device=device)
