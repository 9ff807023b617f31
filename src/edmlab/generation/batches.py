"""One batch of per-seed samples: latents, class labels and the sampler's noise all drawn per seed."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from edmlab.generation.seeds import ClassLabels, draw_labels, seed_generators
from edmlab.precond import DenoiserLike

__all__ = ["Sampler", "generate_batch", "data_shape"]

Sampler = Callable[..., torch.Tensor]  # sampler(denoiser, latents, class_labels=..., generator=[...])


def generate_batch(denoiser: torch.nn.Module, seeds: Sequence[int], sampler: Sampler, *,
                   shape: Sequence[int] | None = None, class_labels: ClassLabels = "random",
                   device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(images [N, *shape] in the latents' float32, class indices [N] or None) for these seeds."""
    device = torch.device(device) if device is not None else next(denoiser.parameters()).device
    shape = tuple(data_shape(denoiser) if shape is None else shape)
    gens = seed_generators(seeds, device)
    latents = torch.stack([torch.randn(shape, generator=g, device=device) for g in gens])
    label_dim = int(denoiser.label_dim)
    labels = draw_labels(gens, seeds, label_dim, class_labels)
    one_hot = None if labels is None else torch.eye(label_dim, device=device)[labels]
    images = sampler(denoiser, latents, class_labels=one_hot, generator=gens)
    return images, labels


def data_shape(denoiser: DenoiserLike) -> tuple[int, ...]:
    """`denoiser.data_shape`, the shape of one sample; an error saying what to pass when it is unknown."""
    if denoiser.data_shape is None:
        raise ValueError(f"cannot tell the sample shape of this {type(denoiser).__name__}: its network was not built "
                         "by edmlab.networks.build; pass shape=[C, H, W] (sample.py: shape=[...])")
    return tuple(denoiser.data_shape)
