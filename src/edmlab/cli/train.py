"""`python train.py [overrides]`: compose configs/train.yaml, build data, denoiser, loss and trainer, fit.

Objects come from the config by `_target_`: the data module, the network (`edmlab.networks.build`, partial; its
data-dependent sizes are filled in here), the preconditioning (`edmlab.precond.Denoiser`, partial), the loss
recipe, the optimizer (partial), loggers and callbacks (with `final_losses`). Resuming (`ckpt_path=last`, a run
folder or a file) restores everything the checkpoint holds and continues the wandb run.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
from omegaconf import DictConfig, OmegaConf, read_write

from edmlab import dist
from edmlab.cli.resolvers import register, repo_root

if TYPE_CHECKING:  # torch and Lightning are imported when training starts: `train.py --help` stays quick
    import lightning as L
    import torch

__all__ = ["main", "train", "build_model", "denoiser_factory", "CONFIG_DIR", "PRECOND_OUT_CHANNELS"]

log = logging.getLogger("edmlab.train")

register()
CONFIG_DIR = str(Path(repo_root()) / "configs")
PRECOND_OUT_CHANNELS = "out_channels_per_image_channel"  # configs/precond/iddpm.yaml


def _data_shape(datamodule) -> tuple[list[int], int, int]:
    """(shape of one item, img_resolution, img_channels) for networks.build; vectors are [d] with res 1."""
    if hasattr(datamodule, "image_shape"):
        # img_resolution refuses non-square images (edmlab.data.images.square_side)
        return [*map(int, datamodule.image_shape)], int(datamodule.img_resolution), int(datamodule.img_channels)
    if hasattr(datamodule, "dim"):
        return [int(datamodule.dim)], 1, int(datamodule.dim)
    raise TypeError(f"data: {type(datamodule).__name__} has neither image_shape nor dim; "
                    "use edmlab.data.ImageDataModule or VectorDataModule")


def denoiser_factory(precond: DictConfig) -> tuple[Callable[[torch.nn.Module], torch.nn.Module], int]:
    """(network -> edmlab.precond.Denoiser, output channels per image channel the network needs) from `precond`."""
    from hydra.utils import instantiate

    kwargs = OmegaConf.to_container(precond, resolve=True)
    per_channel = int(kwargs.pop(PRECOND_OUT_CHANNELS, 1))  # iDDPM's F also predicts a variance
    return instantiate(kwargs), per_channel


def build_model(cfg: DictConfig, datamodule=None, run_config: dict | None = None):
    """(datamodule, EDMModule) from a composed config."""
    from hydra.utils import instantiate

    datamodule = instantiate(cfg.data) if datamodule is None else datamodule
    augment_pipe = instantiate(cfg.model.augment_pipe) if cfg.model.get("augment_pipe") else None
    data_shape, resolution, channels = _data_shape(datamodule)
    if augment_pipe is not None and len(data_shape) != 3:
        raise ValueError("model.augment_pipe: augmentation needs images; set model.augment_pipe=null for "
                         "vector data")
    augment_dim = augment_pipe.augment_dim if augment_pipe is not None else 0
    build_kwargs: dict[str, Any] = dict(img_resolution=resolution, img_channels=channels,
                                        label_dim=int(datamodule.label_dim), augment_dim=augment_dim)
    make_denoiser, per_channel = denoiser_factory(cfg.precond)
    if per_channel != 1 and "out_channels" not in cfg.network:
        build_kwargs["out_channels"] = per_channel * channels
    denoiser = make_denoiser(instantiate(cfg.network)(**build_kwargs))
    recipe = instantiate(cfg.loss)
    model = instantiate(cfg.model, denoiser=denoiser, recipe=recipe, augment_pipe=augment_pipe,
                        data_shape=data_shape, _convert_="all")
    model.run_config = run_config  # not through instantiate: it would build the _target_s inside it
    return datamodule, model


def _instantiate_all(section: DictConfig | dict | None, prefix: str, **extra) -> dict[str, Any]:
    """{config key: object} for each `_target_` node of a section; null entries are switched off."""
    from hydra.utils import instantiate

    out = {}
    for name, node in (section or {}).items():
        if isinstance(node, DictConfig) and "_target_" in node:
            kwargs = {k: v for k, v in extra.get(name, {}).items() if v is not None}
            out[f"{prefix}{name}"] = instantiate(node, **kwargs)
        elif isinstance(node, DictConfig):  # e.g. an experiment's interval for a callback `callbacks=none` removed
            log.warning(f"{prefix}{name} has settings but no _target_ (its config was removed): ignored")
        elif node is not None:
            raise ValueError(f"{prefix}{name}: expected a config with _target_, got {node!r}")
    return out


def _make_trainer(cfg: DictConfig, callbacks: list, loggers: list) -> L.Trainer:
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    from edmlab.cluster import cluster_environment
    from edmlab.training.checkpoint import StreamingCheckpointIO

    extra = {}
    if not cfg.trainer.get("plugins"):  # plugins the config names replace these
        environment = cluster_environment()  # torchrun inside Slurm, Slurm without Lightning's own requeue
        extra["plugins"] = [p for p in (environment, StreamingCheckpointIO()) if p is not None]
    try:
        return instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, **extra)
    except InstantiationException as e:
        import torch

        if "gpu" in str(e).lower() and not torch.cuda.is_available():
            accelerator = cfg.trainer.get("accelerator")
            raise RuntimeError(f"trainer.accelerator={accelerator} but this machine has no CUDA GPU: add "
                               "trainer=cpu (or trainer=ddp_cpu) to the command line") from e
        raise


def _share_run_dir_with_ranks(output_dir: Path) -> None:
    """Lightning relaunches this script for ranks > 0 with hydra.run.dir; make it this run's folder."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.instance().cfg
    with read_write(hydra_cfg), read_write(hydra_cfg.hydra), read_write(hydra_cfg.hydra.run):
        hydra_cfg.hydra.run.dir = str(output_dir)  # a multirun job's folder is not run.dir otherwise
    if hydra_cfg.hydra.mode == RunMode.MULTIRUN:  # the children must run this job, not the whole sweep
        sys.argv = [sys.argv[0], *hydra_cfg.hydra.overrides.task]


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit as the config says; returns the final metrics and the paths written."""
    from edmlab.cli.runlock import lock_run_dir, unlock_run_dir

    output_dir = Path(cfg.paths.output_dir)
    if dist.global_rank() == 0:
        lock_run_dir(output_dir)  # a second run on this folder refuses, naming this one
    try:
        return _fit(cfg)
    finally:
        unlock_run_dir(output_dir)


def _fit(cfg: DictConfig) -> dict[str, Any]:
    from edmlab.checkpoints import (
        CHECKPOINT_KEY,
        CKPT_DIR,
        CKPT_NAME,
        load_training_checkpoint,
        resolve,
    )
    from edmlab.cli.extras import apply_extras, quiet_lightning
    from edmlab.cli.validate import check_callbacks, check_types
    from edmlab.training.checkpoint import sync_export
    from edmlab.training.progress import stopped_by_signal
    from edmlab.training.resume import check_resume
    from edmlab.training.samples import SampleGrid

    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    _share_run_dir_with_ranks(output_dir)
    apply_extras(cfg)
    quiet_lightning()
    if cfg.get("seed") is not None:
        import lightning as L

        L.seed_everything(int(cfg.seed), workers=True, verbose=False)  # same initial weights on every rank

    requested = cfg.get("ckpt_path")
    if requested is None and (output_dir / CKPT_DIR / CKPT_NAME).is_file():
        requested = "last"  # a requeued or restarted job finds its own folder's checkpoint: resume it
        log.info(f"{output_dir} already holds checkpoints/last.ckpt: resuming it")
    # inside a sweep or a requeued Slurm job, "last" means this job's own checkpoint, never another run's
    own_only = bool(os.environ.get("SLURM_RESTART_COUNT")) or "multiruns" in output_dir.parts
    ckpt_path = resolve(requested, training=True, runs_dir=Path(cfg.paths.log_dir) / cfg.task_name / "runs",
                        output_dir=output_dir, own_only=own_only)
    if ckpt_path is not None and ckpt_path.name == CKPT_NAME and dist.global_rank() == 0:
        sync_export(ckpt_path.parent, create=False)  # the run resumed from may have been killed mid-save
    run_config = OmegaConf.to_container(cfg, resolve=True)
    check_types(run_config)  # `optim.lr=fast` fails here in one line, not in fit
    datamodule, model = build_model(cfg, run_config=run_config)

    wandb_id = None
    if ckpt_path is not None:
        checkpoint = load_training_checkpoint(ckpt_path, verify=bool(cfg.get("verify_checkpoint", True)))
        check_resume(checkpoint, model, run_config, ckpt_path)  # before Lightning: a clear reason, no traceback
        wandb_id = checkpoint[CHECKPOINT_KEY].get("wandb_run_id")
        log.info(f"resuming from {ckpt_path} (step {checkpoint.get('global_step')}, wandb run {wandb_id})")
        del checkpoint

    loggers = list(_instantiate_all(cfg.get("logger"), "logger.", wandb={"id": wandb_id}).values())
    callbacks = {**_instantiate_all(cfg.get("callbacks"), "callbacks."),
                 **_instantiate_all({"final_losses": cfg.get("final_losses")}, "")}
    check_callbacks(model, callbacks)  # before fit: not at the first grid, hours in
    trainer = _make_trainer(cfg, list(callbacks.values()), loggers)
    if trainer.is_global_zero:
        for logger in loggers:
            logger.log_hyperparams(run_config)

    with dist.scoped_launch():  # the next job of a sweep in this process starts its own ranks
        trainer.fit(model, datamodule=datamodule, ckpt_path=str(ckpt_path) if ckpt_path else None,
                    weights_only=True if ckpt_path else None)

    result: dict[str, Any] = {k: float(v) for k, v in trainer.callback_metrics.items()}
    result["output_dir"] = str(output_dir)
    stopped = stopped_by_signal(trainer)
    if stopped:
        result["stopped_by_signal"] = stopped
    grid = next((c.final_grid for c in callbacks.values() if isinstance(c, SampleGrid) and c.final_grid), None)
    if grid is not None:  # rank 0, when the run ended with its grid
        result["samples"] = str(grid)
        print(f"samples ({'one row per class' if model.label_dim else 'unconditional'}): {grid}", flush=True)
        print(f"run folder: {output_dir}", flush=True)
    return result


def _in_sweep() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Train; returns cfg.optimized_metric of the final metrics (what Hydra's sweepers minimise)."""
    from omegaconf.errors import InterpolationResolutionError

    from edmlab.checkpoints import IncompatibleCheckpoint
    from edmlab.cli.runlock import RunDirInUse
    from edmlab.cli.validate import ConfigError
    from edmlab.training.module import TrainingDiverged

    try:
        result = train(cfg)
    except (TrainingDiverged, ConfigError, IncompatibleCheckpoint, RunDirInUse, InterpolationResolutionError) as e:
        log.error(str(e))
        if _in_sweep():
            raise  # a failed trial: the sweep goes on with the next one
        raise SystemExit(f"error: {e}") from None  # exit 1 with one line, not a traceback
    if result.get("stopped_by_signal") == "SIGINT":
        raise SystemExit(130)  # interrupted (as a shell reports Ctrl-C), after saving
    metric = cfg.get("optimized_metric")
    if not metric:
        return None
    if metric not in result:
        raise KeyError(f"optimized_metric={metric!r} is not among the final metrics: "
                       f"{', '.join(sorted(result))}")
    return float(result[metric])


if __name__ == "__main__":
    main()
