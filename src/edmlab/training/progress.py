"""Training progress counted in images, as EDM counts it: kimg done, images per second, ETA.

On a terminal a rich progress bar; otherwise (cluster log files) one status line
every `print_every_seconds`, like EDM's ticks.
"""

from __future__ import annotations

import datetime
import logging
import math
import time

import lightning as L
from lightning.pytorch.callbacks import Callback

from edmlab.training.loggers import logs_this_step

__all__ = ["KimgProgress", "StepCallback", "crossed_kimg", "format_eta", "tick_name", "stopped_by_signal"]

log = logging.getLogger(__name__)


def crossed_kimg(step_before: int, step_after: int, batch_size: int, every_kimg: float | None) -> bool:
    """Whether a multiple of `every_kimg` thousand images lies in (step_before, step_after] x batch_size."""
    if not every_kimg or every_kimg <= 0:
        return False
    period = every_kimg * 1000
    return math.floor(step_after * batch_size / period) > math.floor(step_before * batch_size / period)


def tick_name(prefix: str, step: int, batch_size: int, every_kimg: float | None, suffix: str) -> str:
    """File name of a periodic output: by kimg as EDM names snapshots, by step for sub-kimg periods."""
    if every_kimg is not None and every_kimg < 1:
        return f"{prefix}-step{step:07d}{suffix}"
    return f"{prefix}-{round(step * batch_size / 1000):06d}{suffix}"


def stopped_by_signal(trainer: L.Trainer) -> str | None:
    """The signal a callback stopped training on (`callbacks.checkpoint`'s SIGTERM/SIGINT/...), None if none."""
    return next((c.stopped_by_signal for c in trainer.callbacks if getattr(c, "stopped_by_signal", None)), None)


def format_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    return str(datetime.timedelta(seconds=round(seconds)))


class StepCallback(Callback):
    """A callback that acts once per optimizer step (`on_step`), never inside a gradient-accumulation cycle."""

    _seen_step = -1

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._seen_step = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if step == self._seen_step:  # the optimizer has not stepped since the last call
            return
        before, self._seen_step = self._seen_step, step
        self.on_step(trainer, pl_module, before, step)

    def on_step(self, trainer: L.Trainer, pl_module: L.LightningModule, before: int, step: int) -> None:
        """Called after the optimizer moved from step `before` to `step`."""

    @staticmethod
    def crossed(before: int, step: int, pl_module: L.LightningModule, every_kimg: float | None) -> bool:
        """Whether a multiple of `every_kimg` lies in (before, step] for the module's global batch."""
        return crossed_kimg(before, step, pl_module.batch_size, every_kimg)


class KimgProgress(Callback):
    """Shows and logs kimg, images/s and ETA (progress/kimg, progress/img_per_sec, progress/sec_per_kimg)."""

    def __init__(self,
                 print_every_seconds: float = 30.0,   # status-line period when stderr is not a terminal
                 rich: bool | None = None,            # None: a rich bar only on a terminal
                 ) -> None:
        self.print_every_seconds = print_every_seconds
        self.rich = rich
        self._progress = None
        self._task = None
        self._seen_step = -1

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._seen_step = self._first_step = trainer.global_step
        self._t_first: float | None = None  # time of the first finished step (excludes start-up cost)
        self._last_print = self._t_start = time.perf_counter()
        steps = trainer.max_steps
        self.total_kimg = steps * pl_module.batch_size / 1000 if steps > 0 else math.inf
        if not trainer.is_global_zero:
            return
        log.info(f"training to {self.total_kimg:.1f} kimg ({trainer.max_steps} steps of "
                 f"{pl_module.batch_size} images) from {self._kimg(trainer, pl_module):.1f} kimg")
        from rich.console import Console

        console = Console(stderr=True)
        if self.rich or (self.rich is None and console.is_terminal):
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            self._progress = Progress(
                TextColumn("[bold blue]train"), BarColumn(),
                TextColumn("{task.completed:.1f}/{task.total:.1f} kimg"),
                TextColumn("{task.fields[rate]:.0f} img/s"), TextColumn("ETA {task.fields[eta]}"),
                TimeElapsedColumn(), TextColumn("loss {task.fields[loss]}"), console=console, transient=False)
            self._progress.start()
            total = self.total_kimg if math.isfinite(self.total_kimg) else None
            self._task = self._progress.add_task("train", total=total, rate=0.0, eta="?", loss="?",
                                                 completed=self._kimg(trainer, pl_module))

    @staticmethod
    def _kimg(trainer: L.Trainer, pl_module: L.LightningModule) -> float:
        return trainer.global_step * pl_module.batch_size / 1000

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if step == self._seen_step:
            return
        self._seen_step = step
        now = time.perf_counter()
        kimg = self._kimg(trainer, pl_module)
        if self._t_first is None:
            self._t_first, self._step_first = now, step
            rate = math.nan
        else:
            rate = (step - self._step_first) * pl_module.batch_size / max(now - self._t_first, 1e-9)
        eta = (self.total_kimg - kimg) * 1000 / rate if rate > 0 else math.nan
        if math.isfinite(rate) and logs_this_step(trainer):
            pl_module.log("progress/img_per_sec", rate, on_step=True)
            pl_module.log("progress/sec_per_kimg", 1000 / rate, on_step=True)
        if not trainer.is_global_zero:
            return
        loss = trainer.callback_metrics.get("train/loss")
        loss_text = f"{float(loss):.4g}" if loss is not None else "?"
        if self._progress is not None:
            self._progress.update(self._task, completed=kimg, rate=rate if math.isfinite(rate) else 0.0,
                                  eta=format_eta(eta), loss=loss_text)
        elif now - self._last_print >= self.print_every_seconds or step == trainer.max_steps:
            self._last_print = now
            log.info(f"kimg {kimg:.1f}/{self.total_kimg:.1f}  step {step}  {rate:.0f} img/s  "
                     f"ETA {format_eta(eta)}  loss {loss_text}")

    def _stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stop()
        if trainer.is_global_zero:
            seconds = time.perf_counter() - self._t_start
            kimg = self._kimg(trainer, pl_module)
            images = (trainer.global_step - self._first_step) * pl_module.batch_size
            log.info(f"trained {kimg:.1f} kimg in {seconds:.1f} s ({images / seconds:.0f} img/s)")

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule,
                     exception: BaseException) -> None:
        self._stop()
