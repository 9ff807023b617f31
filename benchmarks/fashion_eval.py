"""Pieces of benchmarks/fashion.py: per-seed sampling, FID against reference statistics, a real-data CNN."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

import edmlab.cli  # noqa: F401 - the resolvers a stored config may name


def make_sampler(run_dir: Path, **overrides):
    """(EMA denoiser of the run, its sampler config with `overrides` instantiated) from last_ema.pt."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from edmlab.checkpoints import load_denoiser

    ckpt = Path(run_dir) / "checkpoints" / "last_ema.pt"
    denoiser = load_denoiser(ckpt).eval().requires_grad_(False)
    config = {**torch.load(ckpt, weights_only=True)["config"]["sampler"], **overrides}
    return denoiser, instantiate(OmegaConf.create(config))


@torch.no_grad()
def sample_uint8(denoiser, sampler, num: int, device, batch: int = 250) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 [num, C, H, W] samples for seeds 0..num-1 (random class per seed, EDM's protocol), and classes."""
    from edmlab.generation import iterate_batches, to_uint8

    images, labels = [], []
    for b in iterate_batches(denoiser, range(num), sampler, batch_size=batch, device=device):
        images.append(to_uint8(b.images).cpu())
        labels.append(b.labels.cpu())
    return torch.cat(images), torch.cat(labels)


def test_stats(dataset, detector, num: int | None, device, cache: Path | None = None):
    """Inception statistics of the test set: all images (num None) or a seeded subset of num; read from /
    saved to `cache` when given (the file does not record its count: name it by N)."""
    from edmlab.metrics import compute_stats, load_stats, save_stats

    if cache is not None and Path(cache).is_file():
        return load_stats(cache)
    stats = compute_stats(dataset, detector, num=num, seed=0, batch_size=50, device=device, progress=False)
    if cache is not None:
        save_stats(cache, stats)
    return stats


def fid_of(images: torch.Tensor, detector, ref, num: int | None, device, subset_seed: int = 0) -> float:
    """FID of uint8 images (a seeded subset of num when given) against reference statistics."""
    from edmlab.metrics import calc

    return calc(images, ref, num=num, seed=subset_seed, detector=detector, batch_size=50, device=device,
                progress=False)[0].fid


class SmallCNN(nn.Module):
    """Three conv stages (16, 32, 64 channels) and a linear head for 32x32 grayscale images."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        layers, cin = [], 1
        for cout in (16, 32, 64):
            layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2)]
            cin = cout
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(64 * 4 * 4, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x.float() / 127.5 - 1).flatten(1))


def train_classifier(dataset, num_images: int, device, epochs: int = 3, batch: int = 128) -> SmallCNN:
    """A SmallCNN fit on num_images real training images (seeded, whatever ran before), Adam 1e-3."""
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(dataset), generator=g)[:num_images]
    x, y = torch.from_numpy(dataset.images)[idx], torch.from_numpy(dataset.raw_labels)[idx]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the initial weights: not the global stream, which earlier work consumed
        net = SmallCNN().to(device)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    net.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=g)
        for lo in range(0, len(x), batch):
            b = order[lo:lo + batch]
            loss = nn.functional.cross_entropy(net(x[b].to(device)), y[b].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return net.eval()


@torch.no_grad()
def classify(net: SmallCNN, images: torch.Tensor, labels: torch.Tensor, device, batch: int = 500) -> float:
    """Fraction of uint8 images the classifier labels as `labels`."""
    hits = 0
    for lo in range(0, len(images), batch):
        pred = net(images[lo:lo + batch].to(device)).argmax(1).cpu()
        hits += int((pred == labels[lo:lo + batch]).sum())
    return hits / len(images)
