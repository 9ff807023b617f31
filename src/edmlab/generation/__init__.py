"""Per-seed image generation as EDM's `generate.py` does it: seeds, ranks, resumable files, any checkpoint.

The seams, in the order data flows through them:
- `seeds`: the seed-list parser, the split of the list over ranks, `SeedGenerator` (one generator per seed);
- `batches`: `generate_batch` (one batch) and `iterate_batches` (a rank's stream of `Batch`es);
- `pixels`: `to_uint8`, EDM's one conversion of samples to 8-bit pixels;
- `writers`: where a rank's batches go (PNGs, npz, one grid picture), what is already there, the manifest;
- `grid`: image grids and the training preview's samples;
- `precision`: `with_precision`, a sampler whose network runs under bf16 autocast (the GPU fast path).
`generate` joins them: manifest check, a writer, the iterator, the writer closed; each batch's files are
written in a background thread while the next batch samples.

Image k depends only on seed k and the settings. Batches are consecutive chunks of the seed list and rank r
of W takes every W-th batch, so an interrupted batch is recomputed whole: the written bytes do not depend on
ranks, order or restarts. Across *batch sizes* the random draws are identical too; the network's float32
kernels may round differently for different batch shapes (about 1e-7), which can move a pixel by one level
(a float64 network gives identical bytes in practice).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from edmlab.console import progress as progress_bar
from edmlab.generation.batches import Batch, Sampler, data_shape, generate_batch, iterate_batches
from edmlab.generation.pixels import to_uint8
from edmlab.generation.precision import PRECISIONS, autocast_dtype, with_precision
from edmlab.generation.seeds import ClassLabels, SeedGenerator, batches_for_rank, draw_labels, parse_seeds
from edmlab.generation.writers import check_manifest, npz_name, open_writer, png_path

__all__ = ["parse_seeds", "batches_for_rank", "SeedGenerator", "draw_labels", "Batch", "generate_batch",
           "iterate_batches", "to_uint8", "png_path", "npz_name", "data_shape", "generate", "GenerateResult",
           "PRECISIONS", "autocast_dtype", "with_precision"]

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
    """Generate the images of `seeds` into `outdir` (this rank's share), skipping those already written.

    format="png": outdir/{seed - seed % 1000:06d}/{seed:06d}.png; format="npz": outdir/`npz_name(seeds)` with
    images (uint8 NHWC; `samples` float32 for vector data), seeds and labels (-1: unconditional);
    grid=True: one outdir/grid.png of all seeds (rank 0 draws it). `settings` (what determines the
    pixels) is stored in outdir/sample_settings.json and must match on resume.
    """
    device = torch.device(device) if device is not None else next(denoiser.parameters()).device
    shape = tuple(data_shape(denoiser) if shape is None else shape)
    seeds = [int(s) for s in seeds]
    outdir = Path(outdir)
    writer = open_writer(outdir, seeds, shape, format=format, grid=grid, rank=rank, world_size=world_size)
    if writer is None:
        return GenerateResult()  # one picture: rank 0 draws it
    outdir.mkdir(parents=True, exist_ok=True)
    check_manifest(outdir, settings, rank)
    mine = [s for b in batches_for_rank(seeds, batch_size, writer.rank, writer.world_size) for s in b]
    done = writer.resume(mine)
    result = GenerateResult(skipped=[s for s in mine if s in done])
    if result.skipped:
        log.info(f"rank {rank}: {len(result.skipped)} seed(s) already written in {outdir}, skipped")

    batches = iterate_batches(denoiser.to(device).eval(), seeds, sampler, batch_size=batch_size, rank=writer.rank,
                              world_size=writer.world_size, class_labels=class_labels, shape=shape, device=device,
                              skip=done)
    label = f"rank {rank}/{world_size}" if writer.world_size > 1 else "sampling"
    start = time.perf_counter()
    with (progress_bar(label, len(mine) - len(done), enabled=progress and rank == 0) as advance,
          ThreadPoolExecutor(max_workers=1, thread_name_prefix="edmlab-writer") as files):
        def finish(job: Future) -> None:  # the writer's errors surface here, in the sampling thread
            new = job.result()
            result.written += new
            advance(len(new))

        writing = None
        for batch in batches:
            # The device's work on this batch ends with the copy; its files are written while the next batch
            # samples (a 32x32 PNG takes ~0.4 ms to encode and write: on a GPU, a sizeable share of its time).
            batch = dataclasses.replace(batch, images=batch.images.cpu(),
                                        labels=None if batch.labels is None else batch.labels.cpu())
            if writing is not None:
                finish(writing)
            writing = files.submit(writer.write, batch)
        if writing is not None:
            finish(writing)
    result.seconds = time.perf_counter() - start
    result.paths = writer.close()
    if result.written:
        log.info(f"rank {rank}: {len(result.written)} image(s) in {result.seconds:.1f} s "
                 f"({len(result.written) / max(result.seconds, 1e-9):.1f} img/s) -> {outdir}")
    return result
