"""Checkpointing callback: last.ckpt every N kimg, at the end and on SIGTERM/SIGUSR1, never half-written.

Each save writes a temporary file and renames it over `last.ckpt` (os.replace is
atomic on POSIX), so a job killed at any moment leaves the previous checkpoint
intact. Beside it goes the EMA denoiser as an edmlab inference checkpoint
(`edmlab.interop.save_denoiser`). Signals only set a flag; the save happens at
the next step boundary on every rank together (ranks agree by an all-reduce).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from edmlab.training.progress import crossed_kimg, tick_name
from edmlab.training.resume import CKPT_NAME

__all__ = ["Checkpoint", "EXPORT_NAME"]

log = logging.getLogger(__name__)

EXPORT_NAME = "last_ema.pt"  # the EMA denoiser in edmlab's inference format, next to last.ckpt


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


class Checkpoint(Callback):
    """Writes `dirpath/last.ckpt` (+ `last_ema.pt`) every `every_kimg`, at the end and on signals."""

    def __init__(self,
                 dirpath: str,                                     # usually ${paths.output_dir}/checkpoints
                 every_kimg: float | None = 50.0,                  # None: only at the end and on signals
                 snapshot_every_kimg: float | None = None,         # also keep network-snapshot-<kimg>.pt
                 export: bool = True,                              # write last_ema.pt beside last.ckpt
                 save_on_signals: Sequence[str] = ("SIGTERM", "SIGUSR1"),
                 stop_on_signals: Sequence[str] = ("SIGTERM",),    # save, then end training cleanly
                 save_on_train_end: bool = True,
                 ) -> None:
        self.dirpath = Path(dirpath)
        self.every_kimg = every_kimg
        self.snapshot_every_kimg = snapshot_every_kimg
        self.export = export
        self.save_on_signals = [self._signum(s) for s in save_on_signals]
        self.stop_on_signals = [self._signum(s) for s in stop_on_signals]
        self.save_on_train_end = save_on_train_end
        self.last_saved_step = -1
        self.stopped_by_signal: str | None = None
        self._seen_step = -1
        self._received: set[int] = set()
        self._previous_handlers: dict[int, Any] = {}

    @staticmethod
    def _signum(name: str) -> int:
        try:
            return int(getattr(signal, name))
        except AttributeError as e:
            raise ValueError(f"unknown signal {name!r} in callbacks.checkpoint; use names like SIGTERM, "
                             "SIGUSR1") from e

    @property
    def ckpt_path(self) -> Path:
        return self.dirpath / CKPT_NAME

    # ---------------------------------------------------------------- state in the checkpoint itself
    def state_dict(self) -> dict[str, Any]:
        return {"last_saved_step": self.last_saved_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_saved_step = int(state_dict.get("last_saved_step", -1))

    # ---------------------------------------------------------------- signals
    def _handler(self, signum: int, frame) -> None:
        self._received.add(signum)  # only a flag: saving needs every rank at a step boundary

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # registered after Lightning's own handlers, which it restores at teardown
        self._seen_step = trainer.global_step
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in set(self.save_on_signals) | set(self.stop_on_signals):
            self._previous_handlers[signum] = signal.getsignal(signum)
            signal.signal(signum, self._handler)

    def _agreed_signals(self, trainer: L.Trainer) -> set[int]:
        """The signals received by any rank (all ranks must decide to save at the same step)."""
        watched = sorted(set(self.save_on_signals) | set(self.stop_on_signals))
        local = set(self._received)
        self._received -= local  # a signal landing from here on is handled at the next step
        if trainer.world_size == 1 or not torch.distributed.is_initialized():
            return local
        flags = torch.tensor([float(s in local) for s in watched], device=trainer.strategy.root_device)
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        return {s for s, f in zip(watched, flags.tolist(), strict=True) if f > 0}

    # ---------------------------------------------------------------- saving
    def save(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Collective: every rank calls it; rank 0 writes and renames."""
        self.last_saved_step = trainer.global_step
        self.dirpath.mkdir(parents=True, exist_ok=True)
        tmp = self.dirpath / f".{CKPT_NAME}.tmp"
        trainer.save_checkpoint(tmp, weights_only=False)  # ends with a barrier
        if trainer.is_global_zero:
            _fsync(tmp)
            os.replace(tmp, self.ckpt_path)
            if self.export:
                self._export(pl_module, self.dirpath / EXPORT_NAME)
            # post-hoc EMA profiles go with every checkpoint too, so the end of training can be reconstructed
            self._phema_snapshot(trainer, pl_module, self.snapshot_every_kimg or self.every_kimg)
            kimg = trainer.global_step * pl_module.batch_size / 1000
            log.info(f"saved {self.ckpt_path} at {kimg:.1f} kimg")
        trainer.strategy.barrier("edmlab.checkpoint")

    @staticmethod
    def _export(pl_module: L.LightningModule, path: Path) -> None:
        from edmlab.interop import save_denoiser

        save_denoiser(pl_module.ema.module, path, config=pl_module.run_config)

    def _snapshot(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        step, batch, every = trainer.global_step, pl_module.batch_size, self.snapshot_every_kimg
        self._export(pl_module, self.dirpath / tick_name("network-snapshot", step, batch, every, ".pt"))
        self._phema_snapshot(trainer, pl_module, every)

    def _phema_snapshot(self, trainer: L.Trainer, pl_module: L.LightningModule, every: float | None) -> None:
        """EDM2 post-hoc EMA: every tracked profile at this time, in edmlab.training.phema's format."""
        if pl_module.phema is None or not trainer.is_global_zero:
            return
        from edmlab.training.phema import save_snapshot

        step, batch = trainer.global_step, pl_module.batch_size
        save_snapshot(self.dirpath / tick_name("phema", step, batch, every, ".pt"), pl_module.phema, step * batch,
                      pl_module.denoiser, config=pl_module.run_config)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if step == self._seen_step:  # inside a gradient-accumulation cycle: not a step boundary
            return
        before, self._seen_step = self._seen_step, step
        received = self._agreed_signals(trainer)
        if crossed_kimg(before, step, pl_module.batch_size, self.snapshot_every_kimg):
            self._snapshot(trainer, pl_module)
        if received or crossed_kimg(before, step, pl_module.batch_size, self.every_kimg):
            self.save(trainer, pl_module)
        stop = received & set(self.stop_on_signals)
        if stop:
            self.stopped_by_signal = signal.Signals(min(stop)).name
            log.warning(f"received {self.stopped_by_signal}: saved {self.ckpt_path}, stopping")
            trainer.should_stop = True

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.save_on_train_end and self.last_saved_step != trainer.global_step:
            self.save(trainer, pl_module)
        for signum, handler in self._previous_handlers.items():
            if threading.current_thread() is threading.main_thread():
                signal.signal(signum, handler)
        self._previous_handlers.clear()
