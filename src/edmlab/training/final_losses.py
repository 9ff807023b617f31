"""Callback: EDM's loss of the EMA and the raw weights after training, one yardstick whatever the run's recipe."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from edmlab.training.module import reference_loss
from edmlab.training.progress import stopped_by_signal

__all__ = ["FinalLosses", "final_losses"]


def final_losses(pl_module: L.LightningModule, datamodule, num_images: int = 1024,
                 repeats: int = 4) -> dict[str, float]:
    """final/ema_loss and final/loss: `reference_loss` on the first `num_images` of a seed-0 permutation."""
    dataset = datamodule.dataset
    generator = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(dataset), generator=generator)[:num_images].tolist()
    images, labels = datamodule.collate([dataset[i] for i in idx])
    images = images.to(pl_module.device)
    labels = labels.to(pl_module.device) if labels is not None and pl_module.label_dim else None
    denoiser = pl_module.denoiser
    was_training = denoiser.training
    try:
        return {"final/ema_loss": reference_loss(pl_module.ema.module, images, labels, repeats=repeats),
                "final/loss": reference_loss(denoiser.eval(), images, labels, repeats=repeats)}
    finally:
        denoiser.train(was_training)


class FinalLosses(Callback):
    """After the last step, rank 0 puts `final_losses` into the trainer's metrics (train.py's result dict)."""

    def __init__(self,
                 num_images: int = 1024,   # the fixed subset of the training data
                 repeats: int = 4,         # fixed (sigma, noise) draws per image
                 ) -> None:
        if num_images < 1 or repeats < 1:
            raise ValueError(f"final_losses: num_images={num_images}, repeats={repeats}: both must be >= 1 "
                             "(final_losses=null skips the evaluation)")
        self.num_images, self.repeats = int(num_images), int(repeats)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero or stopped_by_signal(trainer):
            return  # a preempted job saves and exits now; the resumed run evaluates at its own end
        losses = final_losses(pl_module, trainer.datamodule, self.num_images, self.repeats)
        for key, value in losses.items():
            trainer.callback_metrics[key] = torch.tensor(value, dtype=torch.float64)
