"""benchmarks/speed.py's set-up: the models it times, the data they get, the clock and the peak-memory probe."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]

# name -> (overrides, image shape, label_dim, batch on CPU, batch on GPU); CPU rows use tiny batches
MODELS = {
    "digits (unet_small, 0.98M)": (["experiment=digits_edm"], (1, 8, 8), 10, 128, 128),
    "cifar_edm DDPM++ (55.7M)": (["experiment=cifar_edm"], (3, 32, 32), 10, 2, 64),
    "Fashion (fashion_edm's unet_small)": (["experiment=fashion_edm", "~callbacks.fid"], (1, 32, 32), 10, 64, 128),
    "ADM 64x64": (["experiment=cifar_edm", "network=adm", "model.augment_pipe=null"], (3, 64, 64), 1000, 2, 64),
}  # in this order, the slowest last: speed.py writes the report after each model
SMALL = ("digits", "Fashion")  # many timed steps on CPU too
FAST_BATCH = 256  # the GPU fast path's sampling batch (DDPM++ at 32x32 fills an H100 only at a few hundred)


# ------------------------------------------------------------------------------------------ plumbing
def sync_clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:  # freed heap handed back first, so an earlier (bigger) model's leftovers do not count as this one's peak
        import ctypes
        import gc

        gc.collect()
        ctypes.CDLL(None).malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM, the peak resident set


def peak_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    status = Path("/proc/self/status").read_text()
    return float(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM"))) / 1024


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import edmlab.cli  # noqa: F401 - the edmlab.* resolvers

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return hydra_compose("train", overrides=overrides)


def datamodule_for(cfg, shape, label_dim: int, device: torch.device):
    """The config's data module for digits; synthetic uint8 images of the right shape otherwise (no download)."""
    from hydra.utils import instantiate

    from edmlab.data import ImageDataModule
    from edmlab.data.images import ArrayImageDataset

    if shape == (1, 8, 8):
        return instantiate(cfg.data)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(256, *shape), dtype=np.uint8)
    dataset = ArrayImageDataset(images, rng.integers(0, label_dim, size=256), label_dim=label_dim, name="synthetic")
    return ImageDataModule(dataset, batch_size=int(cfg.data.batch_size), pin_memory=device.type == "cuda")
