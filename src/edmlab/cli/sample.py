"""`python sample.py ckpt=...`: compose configs/sample.yaml, load any checkpoint kind, generate this rank's seeds."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from edmlab.checkpoints import CKPT_DIR, Loaded, load_any
from edmlab.cli.resolvers import register, repo_root
from edmlab.dist import distributed_env, local_rank
from edmlab.generation import GenerateResult, generate, parse_seeds, with_precision
from edmlab.guidance import guided

__all__ = ["main", "run", "resolve_device", "ckpt_name", "checkpoint_identity", "CONFIG_DIR"]

log = logging.getLogger("edmlab.sample")

SHORTCUTS = ("solver", "num_steps", "discretization")


def ckpt_name(path: str) -> str:
    """A folder name for a checkpoint's samples: <run folder>-<file stem> for .../<run>/checkpoints/<file>."""
    p = Path(str(path))
    if p.suffix == "" and not p.name.startswith("network-snapshot"):  # a run folder
        return p.name or "samples"
    parent = p.parent.parent if p.parent.name == CKPT_DIR else p.parent
    return f"{parent.name}-{p.stem}" if parent.name not in ("", ".") else p.stem


register()
if not OmegaConf.has_resolver("edmlab.ckpt_name"):
    OmegaConf.register_new_resolver("edmlab.ckpt_name", ckpt_name)
CONFIG_DIR = str(Path(repo_root()) / "configs")


def resolve_device(name: str) -> torch.device:
    """auto: this local rank's GPU when CUDA is there, else the CPU; cuda: this local rank's GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError(f"device={name}, but CUDA is not available here; use device=cpu or device=auto")
        device = torch.device(name if ":" in name else f"cuda:{local_rank() % torch.cuda.device_count()}")
        torch.cuda.set_device(device)
        return device
    return torch.device(name)


def checkpoint_identity(loaded: Loaded) -> dict[str, Any]:
    """What tells two states of a checkpoint file apart: its stored content hash (or the file's sha256), step, size.

    Stored in the outdir's manifest: rerunning into an outdir after more training refuses to mix two models."""
    from edmlab.fileio import file_sha256

    identity: dict[str, Any] = {"bytes": loaded.path.stat().st_size}
    if loaded.kind in ("export", "training"):  # torch.save archives record a hash and a step
        identity.update(sha256=loaded.meta.get("sha256"), global_step=loaded.step)
    if identity.get("sha256") is None:  # EDM pickles and older files: hash the bytes
        identity["sha256"] = file_sha256(loaded.path)
    return identity


def _sampler_config(cfg: DictConfig, ckpt: Path) -> DictConfig:
    """cfg.sampler with the top-level shortcuts (solver, num_steps, discretization) applied; `ckpt`: the file."""
    sampler = cfg.sampler.copy()
    with open_dict(sampler):
        for key in SHORTCUTS:
            if cfg.get(key) is not None:
                sampler[key] = cfg[key]
        if sampler.get("discretization") == "optimized" and sampler.get("steps_cache") is None:  # once per model
            sampler["steps_cache"] = f"{ckpt}.steps.json"
    return sampler


def _decoding(sampler, cfg: DictConfig, loaded: Loaded):
    """decode=auto: samples of a latent model (encoder other than identity in its config) go through its decoder."""
    decode = str(cfg.get("decode", "auto"))
    if decode not in ("auto", "none"):
        raise ValueError(f"decode={decode!r}: use auto (decode latents with the checkpoint's encoder) or none")
    if decode == "none":
        return sampler
    from hydra.utils import instantiate

    from edmlab.encoders import IdentityEncoder, encoder_config

    encoder_cfg = encoder_config(loaded)  # from the metadata already read: no second read of the file
    encoder = instantiate(encoder_cfg) if encoder_cfg else None
    if encoder is None or isinstance(encoder, IdentityEncoder):
        return sampler
    log.info(f"samples are latents: decoding them with {type(encoder).__name__}")
    return lambda *args, **kwargs: encoder.decode(sampler(*args, **kwargs))


def _described(settings: dict[str, Any]) -> str:
    """`solver=heun, num_steps=18, process=edm(sigma_min=0.002, sigma_max=80.0)`: unset keys left out."""
    def value(v: Any) -> str:
        if isinstance(v, dict):
            inner = {k: x for k, x in v.items() if not k.startswith("_") and k != "name"}
            return f"{v.get('name', '')}({_described(inner)})"
        return str(v)

    return ", ".join(f"{k}={value(v)}" for k, v in settings.items() if v is not None)


def run(cfg: DictConfig) -> GenerateResult:
    """Everything `python sample.py` does, given a composed config."""
    from hydra.utils import instantiate

    rank, world_size = distributed_env()
    if cfg.get("attention"):
        from edmlab.networks.layers import set_attention

        set_attention(str(cfg.attention))
    device = resolve_device(str(cfg.device))
    seeds = parse_seeds(OmegaConf.to_container(cfg.seeds) if OmegaConf.is_config(cfg.seeds) else cfg.seeds)
    loaded = load_any(cfg.ckpt, use_ema=bool(cfg.use_ema), map_location=device,
                      verify=bool(cfg.get("verify_hash", True)))
    guide = (load_any(cfg.guide, map_location=device, verify=bool(cfg.get("verify_hash", True)))
             if cfg.get("guide") else None)
    interval = list(cfg.guidance_interval) if cfg.get("guidance_interval") is not None else None
    for model in (loaded, guide) if guide else (loaded,):
        if cfg.get("channels_last"):  # NHWC convolution weights: what GPU convolutions run fastest on
            model.denoiser.to(memory_format=torch.channels_last)
        if cfg.get("compile"):
            model.denoiser.net.compile()
    denoiser = guided(loaded.denoiser, float(cfg.get("guidance", 1.0)), guide=guide.denoiser if guide else None,
                      interval=interval)
    sampler_cfg = _sampler_config(cfg, loaded.path)
    precision = str(cfg.get("precision", "fp32"))
    sampler = _decoding(with_precision(instantiate(sampler_cfg), device, precision), cfg, loaded)  # decode in fp32
    shape = list(cfg.shape) if cfg.get("shape") is not None else None
    class_labels: Any = cfg.class_labels
    # What fixes the pixels: a resumed run must agree (batch size, ranks and format do not change them).
    solver = {k: v for k, v in OmegaConf.to_container(sampler_cfg, resolve=True).items() if not k.startswith("_")}
    settings = {"ckpt": str(loaded.path.resolve()), "checkpoint": checkpoint_identity(loaded),
                "use_ema": bool(cfg.use_ema), "sampler": solver, "class_labels": class_labels,
                "device_type": device.type, "shape": shape, "decode": str(cfg.get("decode", "auto"))}
    if float(cfg.get("guidance", 1.0)) != 1:  # guidance = 1 is the unguided sampler: older folders stay valid
        settings["guidance"] = {"w": float(cfg.guidance), "interval": interval,
                                "guide": str(guide.path.resolve()) if guide else None}
    if precision != "fp32":  # bf16 rounding moves pixels; fp32 folders from before this setting stay valid
        settings["precision"] = precision
    if rank == 0:
        log.info(f"{cfg.ckpt}: {type(denoiser.net).__name__}, precond {denoiser.precond.name}, label_dim "
                 f"{denoiser.label_dim}; {len(seeds)} seed(s) on {world_size} process(es), {device}; "
                 f"{_described(solver)}")
    return generate(denoiser, seeds, cfg.outdir, sampler, batch_size=int(cfg.batch_size), class_labels=class_labels,
                    format=str(cfg.format), grid=bool(cfg.grid), device=device, shape=shape, rank=rank,
                    world_size=world_size, settings=settings, progress=bool(cfg.progress))


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="sample")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
