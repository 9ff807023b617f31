"""The work after training (final losses, preview grid) is configurable: its size, or none at all."""

from __future__ import annotations

from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

import edmlab.cli  # noqa: F401 - the edmlab.* resolvers
from edmlab.checkpoints import load_denoiser
from edmlab.cli.train import train
from edmlab.data import DigitsDataset, ImageDataModule
from edmlab.training.module import reference_loss

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY = ["experiment=digits_edm", "network.model_channels=8", "network.channel_mult=[1,1]", "network.num_blocks=1",
        "data.batch_size=8", "trainer.max_steps=1", "logger=csv", "extras.print_config=false",
        "callbacks.sample_grid=null", "final_samples=null", "trainer.enable_model_summary=false"]


def run(tmp_path: Path, *overrides: str) -> dict:
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("train", overrides=[*TINY, f"paths.output_dir={tmp_path}", f"paths.log_dir={tmp_path}/logs",
                                          *overrides])
    return train(cfg)


def test_final_losses_are_edms_loss_on_the_configured_subset_or_skipped(tmp_path):
    result = run(tmp_path / "a", "final_losses.num_images=24", "final_losses.repeats=2")
    # the same yardstick recomputed from the exported EMA weights: the first 24 of a seed-0 permutation
    dm = ImageDataModule(DigitsDataset(), batch_size=8)
    idx = torch.randperm(len(dm.dataset), generator=torch.Generator().manual_seed(0))[:24].tolist()
    images, labels = dm.collate([dm.dataset[i] for i in idx])
    ema = load_denoiser(tmp_path / "a" / "checkpoints" / "last_ema.pt")
    assert result["final/ema_loss"] == reference_loss(ema, images, labels, repeats=2)
    assert result["final/ema_loss"] != reference_loss(ema, images, labels, repeats=1)

    skipped = run(tmp_path / "b", "final_losses=null")
    assert not any(key.startswith("final/") for key in skipped) and "train/loss" in skipped
