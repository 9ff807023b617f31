"""The work after training (final losses, the sample grid's end-of-run grid) is configurable: its size, or none."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from lightning.pytorch.loggers import CSVLogger

import edmlab.cli  # noqa: F401 - the edmlab.* resolvers
from edmlab.checkpoints import load_denoiser
from edmlab.cli.train import train
from edmlab.data import DigitsDataset, ImageDataModule
from edmlab.generation.grid import preview_samples, render
from edmlab.training import FinalLosses
from edmlab.training.loggers import wandb_logger, wandb_run_id
from edmlab.training.module import reference_loss

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY = ["experiment=digits_edm", "network.model_channels=8", "network.channel_mult=[1,1]", "network.num_blocks=1",
        "data.batch_size=8", "trainer.max_steps=1", "logger=csv", "extras.print_config=false",
        "trainer.enable_model_summary=false"]


def run(tmp_path: Path, *overrides: str, grid: bool = False) -> dict:
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("train", overrides=[*TINY, *([] if grid else ["callbacks.sample_grid=null"]),
                                          f"paths.output_dir={tmp_path}", f"paths.log_dir={tmp_path}/logs",
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


def test_end_of_run_grid_is_the_sample_grid_callbacks_from_the_final_ema_weights(tmp_path):
    grid = ["callbacks.sample_grid.every_kimg=null", "callbacks.sample_grid.per_class=2",
            "callbacks.sample_grid.scale=1", "sampler.num_steps=3", "final_losses=null"]
    result = run(tmp_path, *grid, grid=True)
    assert result["samples"] == str(tmp_path / "samples.png") and not (tmp_path / "samples").exists()
    ema = load_denoiser(tmp_path / "checkpoints" / "last_ema.pt")
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        sampler = instantiate(compose("train", overrides=["sampler.num_steps=3"]).sampler)
    samples, labels = preview_samples(ema, sampler, [1, 8, 8], per_class=2, num_unconditional=64, seed=0)
    expected = np.asarray(render(samples, labels, 2, scale=1))
    assert np.array_equal(np.asarray(PIL.Image.open(tmp_path / "samples.png")), expected)

    skipped = run(tmp_path / "b", *grid, "callbacks.sample_grid.at_train_end=false", grid=True)
    assert "samples" not in skipped and not (tmp_path / "b" / "samples.png").exists()


def test_final_losses_settings_are_checked_and_the_wandb_run_id_comes_from_its_logger(tmp_path):
    with pytest.raises(ValueError, match=r"num_images=0, repeats=4: both must be >= 1 \(final_losses=null skips"):
        FinalLosses(num_images=0)
    wandb = wandb_logger(str(tmp_path), id="run-1234", mode="disabled")
    assert wandb_run_id([CSVLogger(tmp_path), wandb]) == "run-1234"
    assert wandb_run_id([CSVLogger(tmp_path)]) is None
