"""Per-seed image generation as EDM's `generate.py` does it: seeds, ranks, resumable files, any checkpoint.

Image k depends only on seed k and the settings: one `torch.Generator(seed)`
per image draws, in this order, the latents, the class label (for conditional
networks, as EDM's StackedRandomGenerator) and then every noise draw of the
sampler. Batches are consecutive chunks of the seed list and rank r of W takes
every W-th batch, so a batch holds the same seeds whatever the number of
processes, and an interrupted batch is recomputed whole: the written bytes do
not depend on ranks, order or restarts. Across *batch sizes* the random draws
are identical too; the network's float32 kernels may round differently for
different batch shapes (about 1e-7), which can move a pixel by one level
(a float64 network gives identical bytes in practice).
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import re
import sys
import time
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edmlab.dist import distributed_env
from edmlab.fileio import atomic_write
from edmlab.precond import Denoiser

__all__ = ["parse_seeds", "distributed_env", "batches_for_rank", "seed_generators", "draw_labels",
           "generate_batch", "to_uint8_nhwc", "png_path", "data_shape", "load_denoiser_any", "resolve_checkpoint",
           "generate", "GenerateResult", "ACCEPTED_KINDS", "npz_name"]

log = logging.getLogger(__name__)

Sampler = Callable[..., torch.Tensor]  # sampler(denoiser, latents, class_labels=..., generator=[...])
ClassLabels = int | str | None
MANIFEST = "sample_settings.json"
ACCEPTED_KINDS = ("an edmlab inference checkpoint (edmlab.interop.save_denoiser, e.g. checkpoints/last_ema.pt)",
                  "an edmlab Lightning training checkpoint (checkpoints/last.ckpt of `python train.py`)",
                  "an official NVlabs/edm snapshot pickle (network-snapshot-*.pkl)")


# ------------------------------------------------------------------------------------------- seeds and ranks


def parse_seeds(spec: int | str | Sequence[int | str]) -> list[int]:
    """Seeds from "0-49999", "0-9,20,30-31", an int, or a list of ints and "a-b" ranges (ranges inclusive)."""
    parts: list[int | str]
    if isinstance(spec, bool):
        raise ValueError(f"seeds: expected ranges like 0-49999 or a list, got {spec!r}")
    if isinstance(spec, int):
        parts = [spec]
    elif isinstance(spec, str):
        parts = [p for p in spec.replace(" ", "").split(",") if p]
    else:
        parts = list(spec)
    seeds: list[int] = []
    for part in parts:
        text = str(part).strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", text)
        if not m:
            raise ValueError(f"seeds: cannot read {text!r}; use non-negative integers and inclusive ranges, "
                             "e.g. seeds=0-49999 or seeds=[0-9,20,30-31]")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if hi < lo:
            raise ValueError(f"seeds: range {text!r} is empty (write it low-high)")
        seeds.extend(range(lo, hi + 1))
    if not seeds:
        raise ValueError(f"seeds: {spec!r} names no seed")
    if len(set(seeds)) != len(seeds):
        dup = next(s for i, s in enumerate(seeds) if s in seeds[:i])
        raise ValueError(f"seeds: seed {dup} appears more than once in {spec!r}")
    return seeds


def batches_for_rank(seeds: Sequence[int], batch_size: int, rank: int = 0, world_size: int = 1) -> list[list[int]]:
    """Consecutive chunks of `batch_size` seeds; rank r of W takes chunks r, r+W, r+2W, ..."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    chunks = [list(seeds[i:i + batch_size]) for i in range(0, len(seeds), batch_size)]
    return chunks[rank::world_size]


# ------------------------------------------------------------------------------------------- one batch


def seed_generators(seeds: Sequence[int], device: torch.device | str = "cpu") -> list[torch.Generator]:
    """One generator per image, seeded with seed mod 2^32 (EDM's StackedRandomGenerator), on the run device."""
    return [torch.Generator(device=device).manual_seed(int(s) % (1 << 32)) for s in seeds]


def draw_labels(generators: Sequence[torch.Generator], seeds: Sequence[int], label_dim: int,
                class_labels: ClassLabels) -> torch.Tensor | None:
    """Class indices [N] (None for unconditional networks): random per seed, `all` = seed mod label_dim, or fixed.

    Conditional networks always draw the random class (after the latents), as EDM does, so fixing the
    class leaves the sampler's noise stream, hence the image up to its class, unchanged.
    """
    mode = "random" if class_labels is None else class_labels
    if label_dim == 0:
        if mode != "random":
            raise ValueError(f"class_labels={class_labels!r}, but the network is unconditional (label_dim=0); "
                             "use class_labels=random (or null)")
        return None
    device = generators[0].device
    drawn = torch.stack([torch.randint(label_dim, (), generator=g, device=device) for g in generators])
    if mode == "random":
        return drawn
    if mode == "all":
        return torch.tensor([s % label_dim for s in seeds], device=device)
    if isinstance(mode, str) and not mode.lstrip("-").isdigit():
        raise ValueError(f"class_labels={class_labels!r}: use a class index, 'random' or 'all'")
    k = int(mode)
    if not 0 <= k < label_dim:
        raise ValueError(f"class_labels={k} is not a class of this network (0 .. {label_dim - 1})")
    return torch.full((len(seeds),), k, device=device)


def generate_batch(denoiser: torch.nn.Module, seeds: Sequence[int], sampler: Sampler, *,
                   shape: Sequence[int] | None = None, class_labels: ClassLabels = "random",
                   device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(images [N, *shape] in the latents' float32, class indices [N] or None) for these seeds."""
    device = torch.device(device) if device is not None else next(denoiser.parameters()).device
    shape = tuple(data_shape(denoiser) if shape is None else shape)
    gens = seed_generators(seeds, device)
    latents = torch.stack([torch.randn(shape, generator=g, device=device) for g in gens])
    label_dim = int(getattr(denoiser, "label_dim", 0))
    labels = draw_labels(gens, seeds, label_dim, class_labels)
    one_hot = None if labels is None else torch.eye(label_dim, device=device)[labels]
    images = sampler(denoiser, latents, class_labels=one_hot, generator=gens)
    return images, labels


def to_uint8_nhwc(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] images [N, C, H, W] -> uint8 [N, H, W, C]: clip(x * 127.5 + 128, 0, 255) truncated (EDM)."""
    return (images.float() * 127.5 + 128).clip(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def png_path(outdir: str | os.PathLike, seed: int) -> Path:
    """EDM's --subdirs layout: outdir/{seed - seed % 1000:06d}/{seed:06d}.png."""
    return Path(outdir) / f"{seed - seed % 1000:06d}" / f"{seed:06d}.png"


def data_shape(denoiser: torch.nn.Module) -> tuple[int, ...]:
    """The shape of one sample: [C, H, W] for images, [d] for vector (MLP, img_resolution 1) networks."""
    if getattr(denoiser, "data_shape", None):
        return tuple(int(s) for s in denoiser.data_shape)
    net = getattr(denoiser, "net", denoiser)
    config = getattr(net, "build_config", None) or {}
    res = config.get("img_resolution", getattr(net, "img_resolution", None))
    ch = config.get("img_channels", getattr(net, "img_channels", None))
    if res is None or ch is None:
        raise ValueError(f"cannot tell the sample shape of {type(net).__name__}: it has no img_resolution/"
                         "img_channels; pass shape=[C, H, W] (sample.py: shape=[...])")
    if int(res) == 1 and config.get("name", "") == "mlp":
        return (int(ch),)
    return (int(ch), int(res), int(res))


# ------------------------------------------------------------------------------------------- checkpoints


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint file; a training run folder means its checkpoints/last.ckpt (else last_ema.pt)."""
    p = Path(path).expanduser()
    if p.is_dir():
        for candidate in ("checkpoints/last.ckpt", "last.ckpt", "checkpoints/last_ema.pt", "last_ema.pt"):
            if (p / candidate).is_file():
                return p / candidate
        raise FileNotFoundError(f"ckpt={path}: a folder without checkpoints/last.ckpt or last_ema.pt; pass a "
                                "checkpoint file or a run folder of `python train.py`")
    if not p.is_file():
        raise FileNotFoundError(f"ckpt={path}: no such file")
    return p


def _wrong_kind(path: Path, found: str) -> ValueError:
    from edmlab.interop import CheckpointFormatError

    kinds = "\n  - ".join(ACCEPTED_KINDS)
    return CheckpointFormatError(f"{path} is not a checkpoint edmlab can sample from: {found}.\n"
                                 f"Accepted kinds:\n  - {kinds}")


def _load_training_checkpoint(path: Path, ckpt: dict, use_ema: bool, map_location: Any,
                              verify: bool = True) -> Denoiser:
    """The EMA (or raw) denoiser of an edmlab Lightning checkpoint, rebuilt from checkpoint['edmlab']."""
    from edmlab.interop import CheckpointFormatError, build_checked, load_weights, verify_hash

    meta = ckpt["edmlab"]
    if verify:
        verify_hash(ckpt.get("state_dict", {}), meta.get("sha256"), str(path))
    if not meta.get("network"):
        raise CheckpointFormatError(f"{path}: checkpoint['edmlab'] has no 'network' build config; the network "
                                    "was not built with edmlab.networks.build, so it cannot be rebuilt")
    prefix = meta.get("ema_prefix", "ema.module.") if use_ema else "denoiser."
    state = {k[len(prefix):]: v for k, v in ckpt.get("state_dict", {}).items() if k.startswith(prefix)}
    if not state:
        raise CheckpointFormatError(f"{path}: no weights under {prefix!r} in state_dict "
                                    f"({'EMA' if use_ema else 'raw'} weights requested by use_ema={use_ema})")
    denoiser = Denoiser(build_checked(dict(meta["network"]), state, str(path), prefix="net."), **dict(meta["precond"]))
    load_weights(denoiser, state, source=f"{path} ({'EMA' if use_ema else 'raw'} weights)")
    if meta.get("data_shape"):
        denoiser.data_shape = [int(s) for s in meta["data_shape"]]
    return denoiser.to(map_location).eval()


def load_denoiser_any(path: str | os.PathLike, use_ema: bool = True, map_location: Any = "cpu",
                      verify: bool = True) -> Denoiser:
    """A Denoiser from any accepted checkpoint kind, told apart by content (never by file name).

    Reads (a) edmlab inference checkpoints, (b) edmlab Lightning training checkpoints, EMA weights by
    default, and (c) official EDM snapshot pickles, through safe loaders only (weights_only / allowlist).
    """
    from edmlab import interop

    path = resolve_checkpoint(path)
    if zipfile.is_zipfile(path):
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as err:  # noqa: BLE001 - any refusal means the same to the user
            raise _wrong_kind(path, f"torch.load(weights_only=True) refused it ({type(err).__name__}: "
                                    f"{str(err).splitlines()[0] if str(err) else ''}); edmlab never unpickles code "
                                    "from a checkpoint") from err
        if isinstance(ckpt, dict) and ckpt.get("format") == interop.FORMAT:
            if not use_ema:
                raise ValueError(f"{path} is an exported inference checkpoint holding one set of weights; "
                                 "use_ema=false needs a training checkpoint (last.ckpt)")
            return interop.load_denoiser(path, map_location=map_location, verify=verify)
        if isinstance(ckpt, dict) and isinstance(ckpt.get("edmlab"), Mapping):
            return _load_training_checkpoint(path, ckpt, use_ema, map_location, verify)
        if isinstance(ckpt, dict) and "pytorch-lightning_version" in ckpt:
            raise _wrong_kind(path, "a Lightning checkpoint without the 'edmlab' entry (not written by "
                                    "edmlab's training)")
        found = f"a dict with keys {sorted(map(str, ckpt))[:8]}" if isinstance(ckpt, dict) else \
            f"a {type(ckpt).__name__}"
        raise _wrong_kind(path, f"torch.save archive holding {found}")
    with open(path, "rb") as f:
        magic = f.read(2)
    if magic[:1] != b"\x80":
        raise _wrong_kind(path, "neither a torch.save archive nor a pickle")
    if not use_ema:
        raise ValueError(f"{path} is an EDM snapshot, which holds only the EMA network; use_ema=false is not "
                         "available for it")
    try:
        return interop.load_edm_pickle(path).to(map_location)
    except (interop.CheckpointFormatError, interop.UnsafePickleError, pickle.UnpicklingError) as err:
        raise _wrong_kind(path, f"a pickle that is not an EDM network snapshot ({err})") from err


# ------------------------------------------------------------------------------------------- writing


def _atomic(path: Path):
    """edmlab.fileio.atomic_write without fsync: per-image fsyncs would dominate writing 50k PNGs."""
    return atomic_write(path, "wb", fsync=False)


def _save_png(pixels: np.ndarray, path: Path) -> None:
    """One HWC uint8 image: never a truncated PNG under its final name, even if the process is killed."""
    import PIL.Image

    with _atomic(path) as f:
        PIL.Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(f, format="PNG")


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    with _atomic(path) as f:
        np.savez(f, **arrays)


def _check_manifest(outdir: Path, settings: Mapping[str, Any] | None, rank: int) -> None:
    """Refuse to resume into a folder written with other settings (skipped seeds would not match)."""
    if settings is None:
        return
    path = outdir / MANIFEST
    settings = json.loads(json.dumps(settings, default=str))
    if path.is_file():
        old = json.loads(path.read_text())
        diff = [f"{k}: {old.get(k)!r} there, {settings.get(k)!r} now" for k in sorted(set(old) | set(settings))
                if old.get(k) != settings.get(k)]
        if diff:
            raise ValueError(f"{outdir} holds samples written with other settings ({'; '.join(diff)}). Choose "
                             f"another outdir, or delete {path} (and the images) to start over")
    elif rank == 0:
        with _atomic(path) as f:
            f.write((json.dumps(settings, indent=2, sort_keys=True) + "\n").encode())


def _remove_stale_tmp(outdir: Path, seeds: set[int]) -> None:
    """Delete temporary files a killed run left for these seeds (each seed belongs to one rank)."""
    for folder in {png_path(outdir, s).parent for s in seeds}:
        for tmp in folder.glob(".*.png.*.tmp"):  # edmlab.fileio.tmp_name
            stem = tmp.name[1:].split(".", 1)[0]
            if stem.isdigit() and int(stem) in seeds:
                tmp.unlink(missing_ok=True)


@contextmanager
def _progress(total: int, enabled: bool, label: str) -> Iterator[Callable[[int], None]]:
    """A rich bar (img/s, ETA) on a terminal, else a status line every 30 s; yields advance(n)."""
    start = last = time.perf_counter()
    done = 0
    if enabled and total and sys.stderr.isatty():
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        columns = [TextColumn(label), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[rate]} img/s"), TextColumn("ETA"), TimeRemainingColumn()]
        with Progress(*columns, transient=False) as bar:
            task = bar.add_task(label, total=total, rate="?")

            def advance(n: int) -> None:
                nonlocal done
                done += n
                bar.update(task, advance=n, rate=f"{done / max(time.perf_counter() - start, 1e-9):.1f}")

            yield advance
    else:
        def advance(n: int) -> None:
            nonlocal done, last
            done += n
            now = time.perf_counter()
            if enabled and (now - last >= 30 or done == total):
                rate = done / max(now - start, 1e-9)
                eta = (total - done) / rate if rate > 0 else math.inf
                log.info(f"{label} {done}/{total} images, {rate:.1f} img/s, ETA {eta:.0f} s")
                last = now

        yield advance


@dataclass
class GenerateResult:
    """What one rank did: the seeds it wrote and skipped, and the written file(s)."""

    written: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    paths: list[Path] = field(default_factory=list)
    seconds: float = 0.0


def npz_name(seeds: Sequence[int]) -> str:
    """samples-<first>-<last>.npz for a seed range (EDM's FID protocol writes three ranges into one folder);
    other seed lists add a digest of the list, so two lists never share a file."""
    import hashlib

    lo, hi = min(seeds), max(seeds)
    name = f"samples-{lo:06d}-{hi:06d}"
    if list(seeds) != list(range(lo, hi + 1)):
        name += "-" + hashlib.sha1(",".join(map(str, seeds)).encode()).hexdigest()[:8]
    return name + ".npz"


def _npz_part(outdir: Path, rank: int, world: int, name: str) -> Path:
    return outdir / f".{Path(name).stem}-part{rank:04d}-of-{world:04d}.npz"


def _merge_npz_parts(outdir: Path, seeds: Sequence[int], world: int) -> Path | None:
    """Whichever rank finds every part written merges them in seed-list order (an O_EXCL lock picks one)."""
    name = npz_name(seeds)
    parts = [_npz_part(outdir, r, world, name) for r in range(world)]
    if not all(p.is_file() for p in parts):
        return None
    lock = outdir / f".{name}.lock"
    try:
        os.close(os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        log.info(f"another rank is merging the npz parts (delete {lock} if no rank is running)")
        return None
    try:
        loaded = [dict(np.load(p)) for p in parts]
        merged = {k: np.concatenate([part[k] for part in loaded]) for k in loaded[0]}
        order = {int(s): i for i, s in enumerate(merged["seeds"])}
        index = np.array([order[int(s)] for s in seeds])
        out = outdir / name
        _save_npz(out, **{k: v[index] for k, v in merged.items()})
        for p in parts:
            p.unlink(missing_ok=True)
        return out
    finally:
        lock.unlink(missing_ok=True)


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
    _check_manifest(outdir, settings, rank)
    batches = batches_for_rank(seeds, batch_size, 0 if grid else rank, 1 if grid else world_size)
    whole = outdir / npz_name(seeds)
    npz_out = whole if world_size == 1 or grid else _npz_part(outdir, rank, world_size, whole.name)
    mine = [s for b in batches for s in b]
    done: set[int] = set()
    if format == "png" and not grid:
        # A batch with a seed missing is recomputed whole (same batch, same bytes); only missing files are written.
        done = {s for s in mine if png_path(outdir, s).is_file()}
        _remove_stale_tmp(outdir, set(mine) - done)
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
    with _progress(todo, progress and (rank == 0 or grid), label) as advance:
        for batch in batches:
            images, labels = generate_batch(denoiser, batch, sampler, shape=shape, class_labels=class_labels,
                                            device=device)
            if format == "png" and not grid:
                for seed, pix in zip(batch, to_uint8_nhwc(images), strict=True):
                    if seed not in done:
                        _save_png(pix, png_path(outdir, seed))
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
        from edmlab.grid import image_grid

        picture = image_grid(torch.cat(images_all), ncol=math.ceil(math.sqrt(len(seeds))))
        with _atomic(outdir / "grid.png") as f:
            picture.save(f, format="PNG")
        result.paths.append(outdir / "grid.png")
        result.written = list(seeds)
    elif format == "npz" and (batches or not mine):  # a rank without seeds still writes its (empty) part
        image, item = ("images", (*shape[1:], shape[0])) if len(shape) == 3 else ("samples", shape)
        arrays = {image: np.concatenate(images_all) if images_all else
                  np.zeros((0, *item), np.uint8 if len(shape) == 3 else np.float32),
                  "seeds": np.array(seeds_all, dtype=np.int64),
                  "labels": np.concatenate(labels_all).astype(np.int64) if labels_all else np.zeros(0, np.int64)}
        _save_npz(npz_out, **arrays)
        result.written = list(seeds_all)
    if format == "npz" and not grid:
        merged = _merge_npz_parts(outdir, seeds, world_size) if world_size > 1 else None
        result.paths.append(merged or npz_out)
    elif not grid:
        result.paths = [png_path(outdir, s) for s in result.written]
    if result.written:
        log.info(f"rank {rank}: {len(result.written)} image(s) in {result.seconds:.1f} s "
                 f"({len(result.written) / max(result.seconds, 1e-9):.1f} img/s) -> {outdir}")
    return result
