"""OmegaConf resolvers used by configs/: run folders shared by all ranks, durations in kimg, the repo root."""

from __future__ import annotations

import datetime
import itertools
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from edmlab import dist

__all__ = ["register", "run_stamp", "steps_for_kimg", "repo_root", "slurm_tasks_per_node", "slurm_gpus_per_node",
           "local_gpu_count"]


def repo_root() -> str:
    """$EDMLAB_ROOT, else the checkout holding configs/ (editable install), else the working directory."""
    if os.environ.get("EDMLAB_ROOT"):
        return os.environ["EDMLAB_ROOT"]
    root = Path(__file__).resolve().parents[3]
    return str(root if (root / "configs").is_dir() else Path.cwd())


_stamps: dict[str, str] = {}  # parent folder -> the name this process claimed in it


def run_stamp(parent: str | None = None) -> str:
    """The run-folder name, identical on every rank and node of one job.

    $EDMLAB_RUN_STAMP, else the SLURM job/step (srun launches every rank; a requeued job
    gets its folder back), else the torchrun rendezvous id, else the start time. A start time
    is claimed in `parent` by creating the folder (mkdir is exclusive): a run started in the
    same second gets `<time>-1`, `-2`, ...; asked again, this process gets the same name.
    """
    if os.environ.get("EDMLAB_RUN_STAMP"):
        return os.environ["EDMLAB_RUN_STAMP"]
    job, step = os.environ.get("SLURM_JOB_ID"), os.environ.get("SLURM_STEP_ID")
    if job:  # the batch step of a plain sbatch script has no SLURM_STEP_ID
        array = os.environ.get("SLURM_ARRAY_TASK_ID")
        return f"slurm-{job}" + (f"_{array}" if array else "") + (f"-{step}" if step is not None else "")
    rdzv = os.environ.get("TORCHELASTIC_RUN_ID")
    if rdzv and rdzv != "none":
        return f"torchrun-{rdzv}"
    stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    if parent is None:
        return stamp
    if str(parent) not in _stamps:
        Path(parent).mkdir(parents=True, exist_ok=True)
        for n in itertools.count():
            name = stamp if n == 0 else f"{stamp}-{n}"
            try:
                (Path(parent) / name).mkdir()
            except FileExistsError:
                continue
            _stamps[str(parent)] = name
            break
    return _stamps[str(parent)]


def steps_for_kimg(kimg: float, batch_size: int) -> int:
    """Optimizer steps that train on `kimg` thousand images at this global batch size."""
    try:
        kimg, batch_size = float(kimg), int(batch_size)
    except (TypeError, ValueError):
        raise ValueError(f"duration_kimg={kimg!r}, data.batch_size={batch_size!r}: expected a number of kimg and "
                         "an integer batch size") from None
    return max(1, math.ceil(kimg * 1000 / batch_size))


def _job_name(default: str) -> str:
    """Hydra's job (log file) name: rank > 0 processes started by srun/torchrun log to their own file."""
    rank = dist.global_rank()
    return default if rank == 0 else f"{default}_rank{rank}"


def _output_subdir(default: str) -> str | None:
    """Only rank 0 writes the .hydra/ folder (all ranks share one run folder), once it holds the folder's lock."""
    if dist.global_rank() != 0:
        return None
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.RUN:  # sweep jobs: a folder per job
        from edmlab.cli.runlock import lock_run_dir

        output_dir = OmegaConf.select(HydraConfig.get(), "runtime.output_dir", default=None)
        if output_dir:
            lock_run_dir(output_dir)  # before the .hydra/ of a run in use is overwritten
    return default


def _device_count(devices: Any, launcher: str) -> int:
    if isinstance(devices, Sequence) and not isinstance(devices, str):
        count = len(devices)
    else:
        text = str(devices).strip()
        if "," in text:  # Lightning's "0,1,2" device list
            count = len([d for d in text.split(",") if d.strip()])
        else:
            count = int(text) if text.lstrip("-").isdigit() else 0
    if count <= 0:
        raise ValueError(f"hydra/launcher={launcher}: trainer.devices={devices!r} does not say how many GPUs a "
                         "node has; pass trainer.devices=<GPUs per node> (e.g. trainer.devices=8)")
    return count


def slurm_tasks_per_node(devices: Any) -> int:
    """One Slurm task per device: Lightning's SLURMEnvironment maps task = rank = device."""
    return _device_count(devices, "submitit_slurm")


def slurm_gpus_per_node(accelerator: Any, devices: Any) -> int | None:
    """GPUs to request per node (None for CPU training: no --gpus-per-node line)."""
    if str(accelerator) == "cpu":
        return None
    return _device_count(devices, "submitit_slurm")


def local_gpu_count(accelerator: Any) -> int:
    """GPUs the submitit local launcher leaves visible to its jobs (it sets CUDA_VISIBLE_DEVICES=0..n-1)."""
    if str(accelerator) == "cpu":
        return 0
    import torch

    return torch.cuda.device_count()



def register() -> None:
    """Register the edmlab.* resolvers (idempotent)."""
    for name, fn in (("edmlab.root", repo_root), ("edmlab.run_stamp", run_stamp),
                     ("edmlab.steps", steps_for_kimg), ("edmlab.job_name", _job_name),
                     ("edmlab.output_subdir", _output_subdir),
                     ("edmlab.basename", lambda path: Path(str(path)).name),
                     # configs/hydra/launcher/
                     ("edmlab.slurm_tasks", slurm_tasks_per_node), ("edmlab.slurm_gpus", slurm_gpus_per_node),
                     ("edmlab.local_gpu_count", local_gpu_count)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)

