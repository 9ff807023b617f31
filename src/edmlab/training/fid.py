"""Callback: FID of EMA samples during training, EDM's per-seed protocol, split over the DDP ranks.

Sample k uses seed `seed + k` exactly as `sample.py` draws it (`edmlab.generation.iterate_batches`), so the
images do not depend on the number of ranks. Seeds and reference images are cut into consecutive chunks;
rank r takes chunks r, r + W, ...; the features of all chunks are gathered and accumulated in chunk order,
so the statistics, hence the FID, are the same on 1 and on W ranks. Reference statistics of the training
images (no flips) are computed once and cached as an .npz (EDM's format).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import lightning as L
import numpy as np
import torch

from edmlab.dist import distributed_env
from edmlab.generation import autocast_dtype, iterate_batches, to_uint8, with_precision
from edmlab.guidance import guided
from edmlab.metrics.fid import FeatureStats, Stats, frechet_distance, load_stats, save_stats, select_subset
from edmlab.training.progress import StepCallback

__all__ = ["FIDCallback", "gather_in_order", "reference_stats", "sample_stats"]

log = logging.getLogger(__name__)


def gather_in_order(mine: dict[int, np.ndarray], count: int, world: int = 1) -> list[np.ndarray]:
    """Each rank's results {chunk index: array} for chunks 0 .. count - 1, gathered to every rank in chunk order."""
    if world > 1:
        parts: list[dict[int, np.ndarray] | None] = [None] * world
        torch.distributed.all_gather_object(parts, mine)
        mine = {i: f for part in parts for i, f in part.items()}
    return [mine[i] for i in range(count)]


def _stats(features: list[np.ndarray]) -> Stats:
    acc = FeatureStats()
    for f in features:
        acc.update(torch.from_numpy(f))
    return acc.result()


@torch.no_grad()
def _features(detector: torch.nn.Module, images: torch.Tensor) -> np.ndarray:
    return detector(images).to("cpu", torch.float32).numpy()


def reference_stats(dataset, detector: torch.nn.Module, *, num: int | None = None, batch_size: int = 250,
                    device: torch.device | str = "cpu", rank: int = 0, world: int = 1) -> Stats:
    """Statistics of the dataset's uint8 images (all, or EDM's seeded subset of num), sharded over ranks."""
    idx = select_subset(len(dataset), num)
    chunks = [idx[i:i + batch_size] for i in range(0, len(idx), batch_size)]
    load = lambda c: torch.stack([torch.as_tensor(dataset[int(i)][0]) for i in c]).to(device)
    mine = {i: _features(detector, load(chunks[i])) for i in range(rank, len(chunks), world)}
    return _stats(gather_in_order(mine, len(chunks), world))


def sample_stats(denoiser: torch.nn.Module, sampler: Callable, detector: torch.nn.Module, seeds: Sequence[int], *,
                 batch_size: int = 250, device: torch.device | str = "cpu", rank: int = 0, world: int = 1) -> Stats:
    """Statistics of one sample per seed (sample.py's draws, `iterate_batches`), sharded over ranks."""
    seeds = list(seeds)
    batches = iterate_batches(denoiser, seeds, sampler, batch_size=batch_size, rank=rank, world_size=world,
                              device=device)
    mine = {b.index: _features(detector, to_uint8(b.images)) for b in batches}
    return _stats(gather_in_order(mine, math.ceil(len(seeds) / batch_size), world))


def _digest(module: torch.nn.Module) -> str:
    """A short tag of the feature network's weights, so cached statistics never mix two detectors."""
    from edmlab.checkpoints import content_hash

    return content_hash(module.state_dict())[:12]


class FIDCallback(StepCallback):
    """FID of `num` EMA samples vs the training data every `every_kimg` and at the end; logs fid/<num>, final/fid."""

    def __init__(self,
                 sampler: Callable,                         # partial edmlab.sampling.sample (the `sampler` config)
                 every_kimg: float | None = 500.0,          # None: only at the end
                 num: int = 10_000,                         # samples per evaluation
                 ref: str | os.PathLike | None = None,      # cached reference .npz (path or URL); None: cache dir
                 ref_num: int | None = None,                # reference images (None: all training images)
                 batch_size: int = 250,                     # images per batch on each rank
                 seed: int = 0,                             # first seed
                 at_train_end: bool = True,
                 inception: str | os.PathLike | None = None,  # Inception weights file (None: default lookup)
                 detector: torch.nn.Module | None = None,   # feature network (None: the FID Inception-v3)
                 guidance: float = 1.0,                     # w of edmlab.guidance (1: the unguided sampler)
                 guidance_interval: Sequence[float] | None = None,  # (sigma_lo, sigma_hi]: w only there
                 precision: str = "fp32",                   # fp32 | bf16: the network under bf16 autocast
                 ) -> None:
        if num < 2:
            raise ValueError(f"FIDCallback num={num}: FID needs at least 2 samples")
        if batch_size < 1:
            raise ValueError(f"callbacks.fid.batch_size={batch_size}: must be >= 1")
        if every_kimg is not None and not every_kimg > 0:
            raise ValueError(f"callbacks.fid.every_kimg={every_kimg}: must be > 0 (null: only at the end)")
        autocast_dtype(precision)  # an unknown precision fails at start-up, naming the choices
        self.precision = precision
        self.guidance = float(guidance)
        self.guidance_interval = tuple(guidance_interval) if guidance_interval is not None else None
        self.sampler, self.every_kimg, self.num = sampler, every_kimg, int(num)
        self.ref, self.ref_num, self.batch_size, self.seed = ref, ref_num, int(batch_size), int(seed)
        self.at_train_end, self.inception = at_train_end, inception
        self.detector, self._ref_stats = detector, None
        self._scored_step = -1
        self.key = f"fid/{self.num}"

    def check_settings(self, pl_module: L.LightningModule) -> None:
        """At start-up, before any training: the weights exist and guidance fits the model (one-line errors)."""
        if self.guidance != 1 and not pl_module.label_dim:
            raise ValueError(f"callbacks.fid.guidance={self.guidance:g} needs a class-conditional model; this one "
                             "is unconditional: set it to 1")
        if self.detector is None:
            from edmlab.metrics.inception import resolve_weights

            resolve_weights(self.inception)  # raises InceptionWeightsError saying how to get them (make inception)

    def _detector(self, device: torch.device) -> torch.nn.Module:
        if self.detector is None:
            from edmlab.metrics.inception import DEFAULT, InceptionV3FID

            self.detector = InceptionV3FID(weights=self.inception or DEFAULT)
        return self.detector.to(device).eval()

    def _ref_path(self, dataset, detector: torch.nn.Module) -> Path:
        if self.ref is not None:
            return Path(self.ref)
        from edmlab.download import cache_dir

        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(getattr(dataset, "name", type(dataset).__name__)))[:60]
        tag = hashlib.sha256(f"{name}|{len(dataset)}|{self.ref_num}".encode()).hexdigest()[:8]
        return cache_dir() / "fid-refs" / f"{name}-{self.ref_num or 'all'}-{tag}-{_digest(detector)}.npz"

    def reference(self, trainer: L.Trainer, detector: torch.nn.Module, device: torch.device) -> Stats:
        """The training data's statistics: from `ref` / the cache, else computed (sharded) and cached."""
        if self._ref_stats is None:
            dataset = trainer.datamodule.base_dataset
            path = self._ref_path(dataset, detector)
            if re.match(r"https?://", str(self.ref or "")) or path.is_file():
                self._ref_stats = load_stats(self.ref if self.ref is not None else path)
            else:
                rank, world = distributed_env()
                log.info(f"FID reference statistics of {len(dataset)} training images -> {path}")
                self._ref_stats = reference_stats(dataset, detector, num=self.ref_num, batch_size=self.batch_size,
                                                  device=device, rank=rank, world=world)
                if rank == 0:
                    save_stats(path, self._ref_stats)
        return self._ref_stats

    def score(self, trainer: L.Trainer, pl_module: L.LightningModule) -> float:
        """FID now; every rank takes part and gets the same value; rank 0 logs it to every logger."""
        self._scored_step = trainer.global_step
        device = pl_module.device
        detector = self._detector(device)
        ref = self.reference(trainer, detector, device)
        rank, world = distributed_env()
        denoiser = pl_module.ema.module
        was_training = denoiser.training
        denoiser.eval()
        try:
            guided_denoiser = guided(denoiser, self.guidance, interval=self.guidance_interval)
            sampler = with_precision(self.sampler, device, self.precision)
            stats = sample_stats(guided_denoiser, sampler, detector, range(self.seed, self.seed + self.num),
                                 batch_size=self.batch_size, device=device, rank=rank, world=world)
        finally:
            denoiser.train(was_training)
        fid = frechet_distance(stats.mu, stats.sigma, ref.mu, ref.sigma)
        trainer.callback_metrics[self.key] = torch.tensor(fid, dtype=torch.float64)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics({self.key: fid}, step=trainer.global_step)
            kimg = trainer.global_step * pl_module.batch_size / 1000
            log.info(f"{self.key} = {fid:.3f} at {kimg:.1f} kimg")
        return fid

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)

    def on_step(self, trainer: L.Trainer, pl_module: L.LightningModule, before: int, step: int) -> None:
        if self.crossed(before, step, pl_module, self.every_kimg):
            self.score(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.at_train_end or any(getattr(c, "stopped_by_signal", False) for c in trainer.callbacks):
            return  # a preempted job saves and exits; the resumed run scores at its own end
        if self._scored_step != trainer.global_step:
            self.score(trainer, pl_module)
        trainer.callback_metrics["final/fid"] = trainer.callback_metrics[self.key]
