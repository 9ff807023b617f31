"""Batches of per-seed samples: one batch (`generate_batch`) and a rank's stream of them (`iterate_batches`).

Latents, class labels and the sampler's noise are all drawn from the batch's `SeedGenerator`, so an image
depends on its seed and class only. Everything that samples for output (sample.py's writers, the training
preview grid, the FID callback) goes through these two functions.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass

import torch

from edmlab.generation.seeds import ClassLabels, SeedGenerator, batches_for_rank, draw_labels
from edmlab.precond import DenoiserLike

__all__ = ["Sampler", "Batch", "generate_batch", "iterate_batches", "data_shape"]

Sampler = Callable[..., torch.Tensor]  # sampler(denoiser, latents, class_labels=..., generator=[...])


@dataclass(frozen=True)
class Batch:
    """One generated batch: its seeds, the sampler's output [N, *shape], class indices [N] (None: unconditional).

    `index` is the batch's place among the seed list's consecutive chunks (rank r of W gets r, r + W, ...).
    """

    seeds: list[int]
    images: torch.Tensor
    labels: torch.Tensor | None
    index: int = 0


def generate_batch(denoiser: torch.nn.Module, seeds: Sequence[int], sampler: Sampler, *,
                   shape: Sequence[int] | None = None, class_labels: ClassLabels = "random",
                   device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(images [N, *shape] in the latents' float32, class indices [N] or None) for these seeds."""
    device = torch.device(device) if device is not None else next(denoiser.parameters()).device
    shape = tuple(data_shape(denoiser) if shape is None else shape)
    rng = SeedGenerator(seeds, device)
    latents = rng.randn(shape)
    label_dim = int(denoiser.label_dim)
    labels = draw_labels(rng, label_dim, class_labels)
    one_hot = None if labels is None else torch.eye(label_dim, device=device)[labels]
    images = sampler(denoiser, latents, class_labels=one_hot, generator=rng.generators)
    return images, labels


def iterate_batches(denoiser: torch.nn.Module, seeds: Sequence[int], sampler: Sampler, *, batch_size: int,
                    rank: int = 0, world_size: int = 1, class_labels: ClassLabels = "random",
                    shape: Sequence[int] | None = None, device: torch.device | str | None = None,
                    skip: Collection[int] = ()) -> Iterator[Batch]:
    """This rank's batches of `seeds`, generated one at a time; a batch whose seeds are all in `skip` is not.

    A sequence `class_labels` holds one class per seed of `seeds` (in order); the other modes are per batch.
    """
    seeds = [int(s) for s in seeds]
    shape = tuple(data_shape(denoiser) if shape is None else shape)
    per_seed = isinstance(class_labels, Sequence) and not isinstance(class_labels, str)
    if per_seed:
        classes = list(class_labels)
        if len(classes) != len(seeds):
            raise ValueError(f"class_labels: {len(classes)} classes for {len(seeds)} seeds; give one class per seed")
        by_seed = dict(zip(seeds, classes, strict=True))
    for i, chunk in enumerate(batches_for_rank(seeds, batch_size, rank, world_size)):
        if all(s in skip for s in chunk):
            continue
        labels = [by_seed[s] for s in chunk] if per_seed else class_labels
        images, drawn = generate_batch(denoiser, chunk, sampler, shape=shape, class_labels=labels, device=device)
        yield Batch(chunk, images, drawn, index=rank + i * world_size)


def data_shape(denoiser: DenoiserLike) -> tuple[int, ...]:
    """`denoiser.data_shape`, the shape of one sample; an error saying what to pass when it is unknown."""
    if denoiser.data_shape is None:
        raise ValueError(f"cannot tell the sample shape of this {type(denoiser).__name__}: its network was not built "
                         "by edmlab.networks.build; pass shape=[C, H, W] (sample.py: shape=[...])")
    return tuple(denoiser.data_shape)
