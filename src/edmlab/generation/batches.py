"""One batch of per-seed samples: latents, class labels and the sampler's noise all drawn per seed."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from edmlab.generation.seeds import ClassLabels, draw_labels, seed_generators

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
    label_dim = int(getattr(denoiser, "label_dim", 0))
    labels = draw_labels(gens, seeds, label_dim, class_labels)
    one_hot = None if labels is None else torch.eye(label_dim, device=device)[labels]
    images = sampler(denoiser, latents, class_labels=one_hot, generator=gens)
    return images, labels


def data_shape(denoiser: torch.nn.Module) -> tuple[int, ...]:
    """The shape of one sample: [C, H, W] for images, [d] for vector (MLP, img_resolution 1) networks."""
    if getattr(denoiser, "data_shape", None):
        return tuple(int(s) for s in denoiser.data_shape)
    net = getattr(denoiser, "net", denoiser)
    config = getattr(net, "build_config", None) or {}
    res = config.get("img_resolution", getattr(net, "img_resolution", None))
    ch = config.get("img_channels", getattr(net, "img_channels", None))
    if res is None or ch is None:
        raise ValueError(f"cannot tell the sample shape of {type(net).__name__}: it has no img_resolution/"
                         "img_channels; pass shape=[C, H, W] (sample.py: shape=[...])")
    if int(res) == 1 and config.get("name", "") == "mlp":
        return (int(ch),)
    return (int(ch), int(res), int(res))
