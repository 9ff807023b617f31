"""Bits/dim of a dataset under a trained edmlab model: `python scripts/likelihood.py ckpt=... data=...`.

Composes configs/likelihood.yaml (any `data=` config), dequantizes each image with its own seed, integrates
the PF-ODE with the instantaneous change of variables (edmlab.likelihood) and writes <outdir>/likelihood.json
(mean bits/dim with its standard error) and <outdir>/likelihood.npz (per image: index, seed, log_p, bpd).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig

from edmlab.checkpoints import load_any
from edmlab.cli.sample import CONFIG_DIR, resolve_device  # also registers the config resolvers
from edmlab.console import progress
from edmlab.fileio import atomic_write
from edmlab.likelihood import image_bits_per_dim

log = logging.getLogger("edmlab.likelihood")


def select_images(datamodule, subset: str, max_images: int | None) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
    """(dataset indices, uint8 images [N, C, H, W], one-hot labels [N, L]) of the requested subset."""
    base = datamodule.base_dataset
    kept = getattr(datamodule.dataset, "indices", None)  # a torch Subset when data.max_size is set
    if subset == "all":
        index = np.arange(len(base))
    elif subset in ("train", "heldout"):
        if kept is None:
            raise ValueError(f"subset={subset} needs data.max_size (the training subset); use subset=all")
        index = np.asarray(kept) if subset == "train" else np.setdiff1d(np.arange(len(base)), kept)
    else:
        raise ValueError(f"subset={subset!r}: use all, train or heldout")
    index = index[:max_images] if max_images is not None else index
    items = [base[int(i)] for i in index]
    return index, torch.stack([item[0] for item in items]), torch.stack([item[1] for item in items])


def run(cfg: DictConfig) -> dict:
    from hydra.utils import instantiate

    device = resolve_device(str(cfg.device))
    denoiser = load_any(cfg.ckpt, use_ema=bool(cfg.use_ema), map_location=device).denoiser
    index, pixels, labels = select_images(instantiate(cfg.data), str(cfg.subset), cfg.max_images)
    if denoiser.label_dim == 0 or labels.shape[1] == 0:
        labels = None
    elif not cfg.conditional:
        labels = torch.zeros_like(labels)
    seeds = [int(cfg.noise_seed) + int(i) for i in range(len(index))]
    ode = dict(process=str(cfg.process), sigma_min=float(cfg.sigma_min), sigma_max=float(cfg.sigma_max),
               divergence=str(cfg.divergence), probe=str(cfg.probe), num_steps=int(cfg.num_steps))
    with progress("log-likelihood", len(index), enabled=bool(cfg.progress)) as advance:
        out = image_bits_per_dim(denoiser, pixels, labels, seeds=seeds, batch_size=int(cfg.batch_size),
                                 progress=advance, **ode)
    bpd = out["bits_per_dim"].numpy()
    summary = {"ckpt": str(cfg.ckpt), "num_images": len(bpd), "subset": str(cfg.subset),
               "conditional": labels is not None and bool(cfg.conditional), **ode,
               "bits_per_dim": float(bpd.mean()), "bits_per_dim_se": float(bpd.std(ddof=1) / math.sqrt(len(bpd)))
               if len(bpd) > 1 else math.nan, "nats": float(out["log_p"].mean())}
    outdir = Path(cfg.outdir)
    with atomic_write(outdir / "likelihood.npz") as f:
        np.savez(f, index=index, seed=np.array(seeds), log_p=out["log_p"].numpy(), bits_per_dim=bpd)
    with atomic_write(outdir / "likelihood.json", "w") as f:
        f.write(json.dumps(summary, indent=2) + "\n")
    log.info(f"{summary['bits_per_dim']:.4f} +- {summary['bits_per_dim_se']:.4f} bits/dim over {len(bpd)} images "
             f"({cfg.divergence} divergence, {cfg.num_steps} RK4 steps) -> {outdir / 'likelihood.json'}")
    return summary


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="likelihood")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
