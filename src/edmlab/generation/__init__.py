"""Per-seed image generation as EDM's `generate.py` does it: seeds, ranks, resumable files, any checkpoint.

Image k depends only on seed k and the settings (`seeds`). Batches are consecutive chunks of the seed
list and rank r of W takes every W-th batch, so an interrupted batch is recomputed whole: the written
bytes do not depend on ranks, order or restarts. Across *batch sizes* the random draws are identical too;
the network's float32 kernels may round differently for different batch shapes (about 1e-7), which can
move a pixel by one level (a float64 network gives identical bytes in practice).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edmlab.generation.batches import Sampler, data_shape, generate_batch
from edmlab.generation.progress import progress as progress_bar
from edmlab.generation.seeds import ClassLabels, batches_for_rank, draw_labels, parse_seeds, seed_generators
from edmlab.generation.writers import (
    check_manifest,
    merge_npz_parts,
    npz_name,
    npz_part,
    png_path,
    remove_stale_tmp,
    save_npz,
    save_png,
    to_uint8_nhwc,
)

__all__ = ["parse_seeds", "batches_for_rank", "seed_generators", "draw_labels", "generate_batch", "to_uint8_nhwc",
           "png_path", "data_shape", "generate", "GenerateResult", "npz_name"]

log = logging.getLogger(__name__)


@dataclass
class GenerateResult:
    """What one rank did: the seeds it wrote and skipped, and the written file(s)."""

    written: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    paths: list[Path] = field(default_factory=list)
    seconds: float = 0.0


def generate(denoiser: torch.nn.Module, seeds: Sequence[int], outdir: str | os.PathLike, sampler: Sampler, *,
             batch_size: int = 64, class_labels: ClassLabels = "random", format: str = "png", grid: bool = False,
             device: torch.device | str | None = None, shape: Sequence[int] | None = None, rank: int = 0,
             world_size: int = 1, settings: Mapping[str, Any] | None = None, progress: bool = True) -> GenerateResult:
    """Generate the images of `seeds` into `outdir` (this rank's share), skipping PNGs already written.

    format="png": outdir/{seed - seed % 1000:06d}/{seed:06d}.png; format="npz": outdir/`npz_name(seeds)` with
    images (uint8 NHWC; `samples` float32 for vector data), seeds and labels (-1: unconditional);
    grid=True: one outdir/grid.png of all seeds (rank 0 draws it). `settings` (what determines the
    pixels) is stored in outdir/sample_settings.json and must match on resume.
    """
    if format not in ("png", "npz"):
        raise ValueError(f"format={format!r}: use png or npz")
    device = torch.device(device) if device is not None else next(denoiser.parameters()).device
    shape = tuple(data_shape(denoiser) if shape is None else shape)
    if (format == "png" or grid) and (len(shape) != 3 or shape[0] not in (1, 3, 4)):
        raise ValueError(f"samples of shape {list(shape)} are not 1-, 3- or 4-channel images; use format=npz "
                         "(grid=false)")
    seeds = [int(s) for s in seeds]
    outdir = Path(outdir)
    result = GenerateResult()
    if grid and rank != 0:
        return result  # one picture: rank 0 draws it
    outdir.mkdir(parents=True, exist_ok=True)
    check_manifest(outdir, settings, rank)
    batches = batches_for_rank(seeds, batch_size, 0 if grid else rank, 1 if grid else world_size)
    whole = outdir / npz_name(seeds)
    npz_out = whole if world_size == 1 or grid else npz_part(outdir, rank, world_size, whole.name)
    mine = [s for b in batches for s in b]
    done: set[int] = set()
    if format == "png" and not grid:
        # A batch with a seed missing is recomputed whole (same batch, same bytes); only missing files are written.
        done = {s for s in mine if png_path(outdir, s).is_file()}
        remove_stale_tmp(outdir, set(mine) - done)
        batches = [b for b in batches if not done.issuperset(b)]
    elif not grid and npz_out.is_file() and np.load(npz_out)["seeds"].tolist() == mine:
        done = set(mine)  # this rank's part (or the whole single-process file) is already written
        batches = []
    elif not grid and whole.is_file() and set(np.load(whole)["seeds"].tolist()) >= set(seeds):
        result.skipped, result.paths = mine, [whole]
        log.info(f"{whole} already holds every seed; nothing to do")
        return result
    result.skipped = [s for s in mine if s in done]
    if result.skipped:
        log.info(f"rank {rank}: {len(result.skipped)} seed(s) already written in {outdir}, skipped")

    denoiser = denoiser.to(device).eval()
    todo = sum(1 for b in batches for s in b if s not in done)
    images_all, labels_all, seeds_all = [], [], []
    start = time.perf_counter()
    label = f"rank {rank}/{world_size}" if world_size > 1 and not grid else "sampling"
    with progress_bar(todo, progress and (rank == 0 or grid), label) as advance:
        for batch in batches:
            images, labels = generate_batch(denoiser, batch, sampler, shape=shape, class_labels=class_labels,
                                            device=device)
            if format == "png" and not grid:
                for seed, pix in zip(batch, to_uint8_nhwc(images), strict=True):
                    if seed not in done:
                        save_png(pix, png_path(outdir, seed))
                        result.written.append(seed)
            elif grid:
                images_all.append(images.cpu())
            else:
                images_all.append(to_uint8_nhwc(images) if len(shape) == 3 else images.float().cpu().numpy())
                labels_all.append(np.full(len(batch), -1) if labels is None else labels.cpu().numpy())
                seeds_all.extend(batch)
            advance(sum(1 for s in batch if s not in done))
    result.seconds = time.perf_counter() - start

    if grid:
        from edmlab.generation.grid import image_grid
        from edmlab.generation.grid import save_png as save_grid_png

        picture = image_grid(torch.cat(images_all), ncol=math.ceil(math.sqrt(len(seeds))))
        save_grid_png(picture, outdir / "grid.png")
        result.paths.append(outdir / "grid.png")
        result.written = list(seeds)
    elif format == "npz" and (batches or not mine):  # a rank without seeds still writes its (empty) part
        image, item = ("images", (*shape[1:], shape[0])) if len(shape) == 3 else ("samples", shape)
        arrays = {image: np.concatenate(images_all) if images_all else
                  np.zeros((0, *item), np.uint8 if len(shape) == 3 else np.float32),
                  "seeds": np.array(seeds_all, dtype=np.int64),
                  "labels": np.concatenate(labels_all).astype(np.int64) if labels_all else np.zeros(0, np.int64)}
        save_npz(npz_out, **arrays)
        result.written = list(seeds_all)
    if format == "npz" and not grid:
        merged = merge_npz_parts(outdir, seeds, world_size) if world_size > 1 else None
        result.paths.append(merged or npz_out)
    elif not grid:
        result.paths = [png_path(outdir, s) for s in result.written]
    if result.written:
        log.info(f"rank {rank}: {len(result.written)} image(s) in {result.seconds:.1f} s "
                 f"({len(result.written) / max(result.seconds, 1e-9):.1f} img/s) -> {outdir}")
    return result
