"""Frechet Inception Distance as EDM's `fid.py` computes it (Heusel et al. 2017, eq. 6; Karras et al. 2022).

Protocol: Inception-v3 `pool_3` features of uint8 images (`edmlab.metrics.inception`), statistics in
float64 (mu = mean, Sigma = unbiased covariance), FID = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrtm(S1 S2)) with
scipy's sqrtm, real part. Reference statistics use every image of the dataset (no flips); `calc` uses
`num` images (default 50,000; a larger set is subsampled with EDM's seeded shuffle) and can report the
minimum over several runs, the paper's minimum over three seed ranges. Statistics files are .npz with
`mu` and `sigma` (EDM's reference format, e.g. its `cifar10-32x32.npz`), plus `features` on request.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from edmlab import console
from edmlab.fileio import atomic_write
from edmlab.generation.seeds import parse_seeds
from edmlab.metrics.inception import InceptionV3FID, cache_dir, download, is_offline

FID_NUM = 50_000                                     # EDM: --num default, and images per seed range
EDM_SEED_RANGES = ("0-49999", "50000-99999", "100000-149999")  # the paper's three runs


@dataclass
class Stats:
    """Feature statistics of one image set: mean [D], unbiased covariance [D, D], count, optional features.

    `num` is 0 for statistics read from a file without features (EDM's files do not store the count).
    """

    mu: np.ndarray
    sigma: np.ndarray
    num: int
    features: np.ndarray | None = None


@dataclass
class FIDRun:
    """One FID evaluation: which images (source, seed selection), how many, and the results."""

    source: str
    seeds: str | None
    num: int
    fid: float
    precision: float | None = None
    recall: float | None = None


class FeatureStats:
    """Running mean and scatter of feature batches in float64 (Chan et al. 1979 pairwise update)."""

    def __init__(self, keep_features: bool = False) -> None:
        self.n = 0
        self.mu: torch.Tensor | None = None
        self.scatter: torch.Tensor | None = None  # sum of (x - mu)(x - mu)^T
        self.kept: list[torch.Tensor] | None = [] if keep_features else None

    def update(self, features: torch.Tensor) -> None:
        x = torch.as_tensor(features).to(torch.float64)
        m = len(x)
        if m == 0:
            return
        if self.kept is not None:
            self.kept.append(torch.as_tensor(features).detach().to("cpu", torch.float32))
        batch_mu = x.mean(0)
        centered = x - batch_mu
        batch_scatter = centered.T @ centered
        if self.mu is None:
            self.n, self.mu, self.scatter = m, batch_mu, batch_scatter
            return
        delta, total = batch_mu - self.mu, self.n + m
        self.mu = self.mu + delta * (m / total)
        self.scatter = self.scatter + batch_scatter + torch.outer(delta, delta) * (self.n * m / total)
        self.n = total

    def result(self) -> Stats:
        if self.n < 2:
            raise ValueError(f"need at least 2 images for a covariance, got {self.n}")
        features = torch.cat(self.kept).numpy() if self.kept is not None else None
        return Stats(self.mu.cpu().numpy(), (self.scatter / (self.n - 1)).cpu().numpy(), self.n, features)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Frechet distance of N(mu1, S1), N(mu2, S2): ||mu1-mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), float64."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"statistics disagree: mu1 {mu1.shape}, sigma1 {sigma1.shape}, mu2 {mu2.shape}, "
                         f"sigma2 {sigma2.shape}; expected [D] and [D, D] with one D")
    with warnings.catch_warnings():
        # Singular when fewer images than dimensions; EDM silences it too (disp=False), keeps the real part.
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    return float(np.real(np.square(mu1 - mu2).sum() + np.trace(sigma1 + sigma2 - 2 * covmean)))


def select_subset(n: int, num: int | None, seed: int = 0) -> np.ndarray:
    """EDM's max_size rule: all indices, or `num` of them chosen by a seeded shuffle and kept in order."""
    idx = np.arange(n, dtype=np.int64)
    if num is not None and n > num:
        np.random.RandomState(seed % (1 << 31)).shuffle(idx)
        idx = np.sort(idx[:num])
    return idx


def image_seeds(dataset: Dataset, path: str | os.PathLike | None) -> np.ndarray:
    """The seed of each image: the `seeds` array of an .npz, or the integer file names of a folder."""
    if path is not None and Path(path).suffix == ".npz":
        with np.load(path, allow_pickle=False) as f:
            if "seeds" not in f:
                raise ValueError(f"{path}: no 'seeds' array, so images cannot be selected by seed "
                                 f"(found {sorted(f.files)})")
            return f["seeds"].astype(np.int64)
    names = getattr(dataset, "names", None)
    if names is None:
        raise ValueError(f"{path or dataset}: selecting by seed needs an image folder/zip or an .npz with "
                         f"'seeds'")
    stems = [Path(n).stem for n in names]
    bad = [n for n, s in zip(names, stems, strict=True) if not s.isdigit()]
    if bad:
        raise ValueError(f"{path}: selecting by seed needs files named by seed (e.g. 000123.png); "
                         f"{len(bad)} are not, e.g. {bad[0]!r}")
    return np.array([int(s) for s in stems], dtype=np.int64)


def _as_dataset(source) -> tuple[Dataset, str | None]:
    """A path (via edmlab.data.open_images), a Dataset, uint8 torch [N, C, H, W] or numpy [N, H, W, C]."""
    from edmlab.data.images import ArrayImageDataset

    if isinstance(source, str | os.PathLike):
        from edmlab.data import open_images

        return open_images(source), str(source)
    if isinstance(source, torch.Tensor):
        return ArrayImageDataset(source.cpu().numpy()), None
    if isinstance(source, np.ndarray):
        source = source[..., None] if source.ndim == 3 else source
        if source.ndim != 4:
            raise ValueError(f"numpy images must be uint8 [N, H, W, C] or [N, H, W], got {source.shape}")
        return ArrayImageDataset(source.transpose(0, 3, 1, 2)), None
    if isinstance(source, Dataset):
        return source, None
    raise TypeError(f"cannot read images from {type(source).__name__}; expected a path, a Dataset or a uint8 "
                    f"array")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def compute_stats(source, detector: torch.nn.Module | None = None, *,
                  num: int | None = None,           # None: every image; else exactly num (seeded subset)
                  seed: int = 0,                    # subset seed (EDM --seed)
                  seeds: str | Sequence[int] | None = None,  # only images with these generation seeds
                  batch_size: int = 64,
                  device: torch.device | str | None = None,
                  num_workers: int = 0,
                  keep_features: bool = False,      # also return the float32 features [N, D]
                  progress: bool = True) -> Stats:
    """Inception statistics of an image set, streamed over batches (EDM `calculate_inception_stats`)."""
    dataset, path = _as_dataset(source)
    device = torch.device(device) if device is not None else default_device()
    detector = (detector if detector is not None else InceptionV3FID()).to(device)
    idx = np.arange(len(dataset), dtype=np.int64)
    if seeds is not None:
        wanted = np.array(parse_seeds(seeds), dtype=np.int64)
        have = image_seeds(dataset, path)
        idx = np.flatnonzero(np.isin(have, wanted))
        if len(idx) < len(wanted):
            missing = np.setdiff1d(wanted, have)
            raise ValueError(f"{path}: {len(missing)} of {len(wanted)} requested seeds have no image, e.g. "
                             f"seed {missing[0]}")
    where = f"{path or 'images'}" + (f" (seeds {seeds})" if isinstance(seeds, str) else "")
    if num is not None and len(idx) < num:
        raise ValueError(f"{where}: found {len(idx)} images, but expected at least {num} (FID is biased by "
                         f"the sample size; pass a smaller --num only for quick, non-comparable numbers)")
    idx = idx[select_subset(len(idx), num, seed)]
    if len(idx) < 2:
        raise ValueError(f"{where}: found {len(idx)} images, need at least 2 to compute statistics")
    loader = DataLoader(Subset(dataset, idx.tolist()), batch_size=batch_size, num_workers=num_workers,
                        pin_memory=device.type == "cuda")
    stats = FeatureStats(keep_features)
    with console.progress(f"Inception features of {where}", len(idx), enabled=progress) as advance, torch.no_grad():
        for batch in loader:
            images = batch[0] if isinstance(batch, list | tuple) else batch
            stats.update(detector(images.to(device, non_blocking=True)))
            advance(len(images))
    return stats.result()


def save_stats(path: str | os.PathLike, stats: Stats, features: bool = False) -> None:
    """Write `mu`, `sigma` (and `features` if asked and present) to an .npz, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"mu": stats.mu, "sigma": stats.sigma}
    if features:
        if stats.features is None:
            raise ValueError("save_stats(features=True) needs stats computed with keep_features=True")
        arrays["features"] = stats.features
    with atomic_write(path) as f:
        np.savez(f, **arrays)


def load_stats(path: str | os.PathLike) -> Stats:
    """Read reference statistics (`mu`, `sigma`, optional `features`) from an .npz path or URL (cached)."""
    path = str(path)
    if re.match(r"https?://", path):
        local = cache_dir() / "fid-refs" / path.rstrip("/").rsplit("/", 1)[-1]
        if not local.is_file():
            if is_offline():
                raise FileNotFoundError(f"{path}: not cached at {local} and downloads are off; put it there")
            download(path, local)
        path = str(local)
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such statistics file (make one with `python scripts/fid.py ref "
                                f"--data DATASET --dest {path}`)")
    with np.load(path, allow_pickle=False) as f:
        if "mu" not in f or "sigma" not in f:
            raise ValueError(f"{path}: expected arrays 'mu' [D] and 'sigma' [D, D], found {sorted(f.files)}")
        mu, sigma = f["mu"].astype(np.float64), f["sigma"].astype(np.float64)
        features = f["features"] if "features" in f else None
    d = mu.shape[0] if mu.ndim == 1 else -1
    if mu.ndim != 1 or sigma.shape != (d, d):
        raise ValueError(f"{path}: 'mu' {mu.shape} and 'sigma' {sigma.shape} are not [D] and [D, D]")
    return Stats(mu, sigma, len(features) if features is not None else 0, features)


def ref(data, dest: str | os.PathLike | None = None, *, features: bool = False, **kwargs) -> Stats:
    """Reference statistics of a dataset from ALL its images (EDM `fid.py ref`), saved to `dest` if given."""
    stats = compute_stats(data, num=None, keep_features=features, **kwargs)
    if dest is not None:
        save_stats(dest, stats, features=features)
    return stats


def _runs(images: Sequence, seeds: Sequence | None) -> list[tuple[object, str | Sequence[int] | None]]:
    """Pair image sources with seed selections: one source x many ranges, many sources x one, or 1:1."""
    seeds = list(seeds) if seeds else [None]
    if len(images) == 1 or len(seeds) == 1 or len(images) == len(seeds):
        n = max(len(images), len(seeds))
        return [(images[i if len(images) > 1 else 0], seeds[i if len(seeds) > 1 else 0]) for i in range(n)]
    raise ValueError(f"{len(images)} image sources and {len(seeds)} seed selections: give one source with "
                     f"several seed ranges, several sources with one (or no) range, or as many of each")


def calc(images, reference: str | os.PathLike | Stats, *,
         seeds: Sequence[str | Sequence[int]] | None = None,  # one selection per run (see _runs)
         num: int | None = FID_NUM,
         precision_recall: bool = False,   # also Kynkaanniemi et al. (needs reference features)
         k: int = 3,
         detector: torch.nn.Module | None = None,
         **kwargs) -> list[FIDRun]:
    """FID of one or several image sets against reference statistics; EDM reports the min over the runs."""
    from edmlab.metrics.precision_recall import precision_recall as pr

    ref_stats = reference if isinstance(reference, Stats) else load_stats(reference)
    if precision_recall and ref_stats.features is None:
        raise ValueError(f"{reference}: precision/recall needs reference features; recompute the reference "
                         f"with `scripts/fid.py ref --features`")
    sources = list(images) if isinstance(images, list | tuple) else [images]
    device = torch.device(kwargs["device"]) if kwargs.get("device") is not None else default_device()
    detector = (detector if detector is not None else InceptionV3FID()).to(device)
    results = []
    for source, selection in _runs(sources, seeds):
        stats = compute_stats(source, detector, num=num, seeds=selection, keep_features=precision_recall,
                              **kwargs)
        if stats.mu.shape != ref_stats.mu.shape:
            raise ValueError(f"{source}: {stats.mu.shape[0]}-d features but the reference has "
                             f"{ref_stats.mu.shape[0]}-d; both must come from the same Inception network")
        run = FIDRun(str(source) if isinstance(source, str | os.PathLike) else type(source).__name__,
                     selection if isinstance(selection, str | None) else f"{len(selection)} seeds",
                     stats.num, frechet_distance(stats.mu, stats.sigma, ref_stats.mu, ref_stats.sigma))
        if precision_recall:
            run.precision, run.recall = pr(ref_stats.features, stats.features, k=k, device=device)
        results.append(run)
    return results
