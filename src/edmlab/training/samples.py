"""Callback: a fixed-seed grid from the EMA denoiser every N kimg, saved as PNG and sent to the loggers.

Image i of the grid is sample.py's image for seed `seed + i` and its row's class (`preview_samples`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import lightning as L
import numpy as np
import PIL.Image

from edmlab.generation.grid import preview_samples, render, save_png
from edmlab.guidance import guided
from edmlab.training.progress import StepCallback, stopped_by_signal, tick_name

__all__ = ["SampleGrid", "draw_samples"]

log = logging.getLogger(__name__)


def draw_samples(pl_module: L.LightningModule, sampler: Callable, *, per_class: int = 10,
                 num_unconditional: int = 64, seed: int = 0, scale: int = 1, guidance: float = 1.0,
                 guidance_interval: Sequence[float] | None = None) -> PIL.Image.Image:
    """The EMA denoiser's grid: one row per class (or a square of unconditional samples / a 2-D scatter).

    guidance = w != 1 draws with classifier-free guidance (conditional models only).
    """
    denoiser = guided(pl_module.ema.module, guidance, interval=guidance_interval)
    samples, labels = preview_samples(denoiser, sampler, pl_module.data_shape, per_class=per_class,
                                      num_unconditional=num_unconditional, seed=seed, device=pl_module.device)
    return render(samples, labels, per_class, scale=scale)


def _log_image(trainer: L.Trainer, key: str, image: PIL.Image.Image) -> None:
    from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key=key, images=[image], step=trainer.global_step)
        elif isinstance(logger, TensorBoardLogger):
            array = np.asarray(image)
            logger.experiment.add_image(key, array, trainer.global_step,
                                        dataformats="HW" if array.ndim == 2 else "HWC")


class SampleGrid(StepCallback):
    """Every `every_kimg` and after the last step, sample the same seeds with the EMA weights.

    Rank 0 writes `dirpath/<kimg>.png` (the end-of-run grid: `final_path` when given) and sends it to the loggers.
    """

    def __init__(self,
                 sampler: Callable,                  # partial edmlab.sampling.sample (the `sampler` config)
                 dirpath: str,                       # usually ${paths.output_dir}/samples
                 every_kimg: float | None = 50.0,    # None: only at the end
                 per_class: int = 10,                # columns per class row (conditional models)
                 num_unconditional: int = 64,        # images for unconditional models
                 seed: int = 0,                      # first seed; image i uses seed + i
                 scale: int = 1,                     # nearest-neighbour upscaling of the saved grid
                 at_train_end: bool = True,          # a grid after the last step (not after a signal's stop)
                 guidance: float = 1.0,              # classifier-free guidance weight w (1: none)
                 guidance_interval: Sequence[float] | None = None,  # [sigma_lo, sigma_hi] where w applies
                 final_path: str | None = None,      # the end-of-run grid goes here (None: into dirpath)
                 ) -> None:
        self.sampler = sampler
        self.dirpath = Path(dirpath)
        self.every_kimg = every_kimg
        self.per_class, self.num_unconditional = per_class, num_unconditional
        self.seed, self.scale = seed, scale
        self.at_train_end = at_train_end
        self.guidance, self.guidance_interval = float(guidance), guidance_interval
        self.final_path = Path(final_path) if final_path else None
        self.final_grid: Path | None = None  # the end-of-run grid rank 0 wrote
        self._drawn_step = -1
        self._last: tuple[Path, PIL.Image.Image] | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if self.guidance != 1 and pl_module.label_dim == 0:
            raise ValueError(f"callbacks.sample_grid.guidance={self.guidance:g} needs a class-conditional model; "
                             "this one is unconditional (label_dim=0): set guidance to 1")
        if self.guidance != 1 and not pl_module.denoiser.net.label_dropout:
            log.warning("sample_grid.guidance != 1, but the network trains without label dropout: its "
                        "unconditional branch is untrained (set network.label_dropout, e.g. 0.1)")

    def draw(self, trainer: L.Trainer, pl_module: L.LightningModule, path: Path | None = None) -> Path | None:
        """Sample the grid now; rank 0 writes it to `path` (default: dirpath/<kimg>.png) and the loggers."""
        self._drawn_step = trainer.global_step
        if not trainer.is_global_zero:
            return None
        image = draw_samples(pl_module, self.sampler, per_class=self.per_class,
                             num_unconditional=self.num_unconditional, seed=self.seed, scale=self.scale,
                             guidance=self.guidance, guidance_interval=self.guidance_interval)
        kimg = trainer.global_step * pl_module.batch_size / 1000
        name = tick_name("samples", trainer.global_step, pl_module.batch_size, self.every_kimg, ".png")
        path = save_png(image, path or self.dirpath / name)
        self._last = (path, image)
        _log_image(trainer, "samples", image)
        log.info(f"sample grid at {kimg:.1f} kimg: {path}")
        return path

    def on_step(self, trainer: L.Trainer, pl_module: L.LightningModule, before: int, step: int) -> None:
        if self.crossed(before, step, pl_module, self.every_kimg):
            self.draw(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.at_train_end or stopped_by_signal(trainer):
            return  # a preempted job saves and exits now; the resumed run draws at its own end
        if self._drawn_step != trainer.global_step:
            self.draw(trainer, pl_module, self.final_path)
        elif self._last is not None and self.final_path is not None:  # this step's periodic grid, also there
            self._last = (save_png(self._last[1], self.final_path), self._last[1])
        self.final_grid = self._last[0] if self._last is not None else None  # None on ranks > 0
