"""This process's place in the job, read from the launcher's environment: edmlab's one rank source.

Every rank, world-size and local-rank variable (torchrun, Slurm srun, Lightning's launcher, MPI) is read
here and nowhere else; `environ` stands in for os.environ in tests.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

__all__ = ["distributed_env", "global_rank", "world_size", "local_rank", "LaunchInfo", "launch_info", "scoped_launch"]

# (rank, size) variables of the launchers that start every rank themselves, after torchrun's RANK/WORLD_SIZE
_TASK_VARIABLES = (("SLURM_PROCID", "SLURM_NTASKS"),                    # srun
                   ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),    # Open MPI's mpirun
                   ("PMI_RANK", "PMI_SIZE"))                            # MPICH / Intel MPI
_LOCAL_RANK_VARIABLES = ("LOCAL_RANK", "SLURM_LOCALID", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID")
_LIGHTNING_LAUNCHER_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


def _env(environ: Mapping[str, str] | None) -> Mapping[str, str]:
    return os.environ if environ is None else environ


def _env_int(environ: Mapping[str, str], *names: str) -> int | None:
    for name in names:
        value = environ.get(name, "")
        if value.strip().isdigit():
            return int(value)
    return None


def distributed_env(environ: Mapping[str, str] | None = None) -> tuple[int, int]:
    """(rank, world size) from torchrun (RANK/WORLD_SIZE), srun, MPI or Lightning's launcher; (0, 1) alone."""
    env = _env(environ)
    world = _env_int(env, "WORLD_SIZE")
    rank = _env_int(env, "RANK")
    tasks = next(((_env_int(env, r), _env_int(env, w)) for r, w in _TASK_VARIABLES
                  if _env_int(env, r) is not None and _env_int(env, w) is not None), None)
    if world is not None and rank is not None:
        pass
    elif tasks is not None:
        rank, world = tasks
    elif world is not None and _env_int(env, "LOCAL_RANK") is not None:  # Lightning's subprocess launcher
        node, local = _env_int(env, "NODE_RANK", "GROUP_RANK") or 0, _env_int(env, "LOCAL_RANK")
        per_node = _env_int(env, "LOCAL_WORLD_SIZE")
        if node and per_node is None:
            raise RuntimeError("multi-node run without RANK or LOCAL_WORLD_SIZE: cannot tell this process's rank; "
                               "launch with torchrun or srun")
        rank = node * (per_node or world) + local
    else:
        return 0, 1
    if not 0 <= rank < world:
        raise RuntimeError(f"rank {rank} is not in [0, {world}) (check RANK/WORLD_SIZE or SLURM_PROCID/SLURM_NTASKS)")
    return rank, world


def global_rank(environ: Mapping[str, str] | None = None) -> int:
    """This process's rank as set by the launcher (torchrun, SLURM srun, MPI, Lightning), 0 if none."""
    return distributed_env(environ)[0]


def world_size(environ: Mapping[str, str] | None = None) -> int:
    """The number of processes of this job as set by the launcher, 1 if none."""
    return distributed_env(environ)[1]


def local_rank(environ: Mapping[str, str] | None = None) -> int:
    """This process's index among the ranks on its node (its GPU), 0 if no launcher says."""
    return _env_int(_env(environ), *_LOCAL_RANK_VARIABLES) or 0


@dataclass(frozen=True)
class LaunchInfo:
    """Who started this process and the world it belongs to."""

    launcher: str           # "torchrun", "slurm" (srun) or "local" (Lightning starts the other ranks itself)
    world_size: int
    num_nodes: int
    tasks_per_node: int
    node_rank: int
    global_rank: int


def launch_info(environ: Mapping[str, str] | None = None) -> LaunchInfo:
    """torchrun wins over Slurm: `srun torchrun ...` starts one torchrun per node, which starts the ranks."""
    env = _env(environ)
    if env.get("TORCHELASTIC_RUN_ID") is not None and "LOCAL_WORLD_SIZE" in env:
        rank, world = distributed_env(env)
        local = _env_int(env, "LOCAL_WORLD_SIZE") or 1
        return LaunchInfo("torchrun", world, max(1, world // local), local, _env_int(env, "GROUP_RANK") or 0, rank)
    if env.get("SLURM_STEP_ID") is not None and "SLURM_NTASKS" in env and \
            env.get("SLURM_JOB_NAME") not in ("bash", "interactive"):
        rank, world = distributed_env(env)
        nodes = _env_int(env, "SLURM_STEP_NUM_NODES", "SLURM_NNODES") or 1
        per_node = _env_int(env, "SLURM_NTASKS_PER_NODE") or max(1, world // nodes)
        return LaunchInfo("slurm", world, nodes, per_node, _env_int(env, "SLURM_NODEID") or 0, rank)
    return LaunchInfo("local", 1, 1, 1, 0, 0)


@contextmanager
def scoped_launch() -> Iterator[None]:
    """On exit, undo what a fit's launcher left in this process: the process group and Lightning's variables.

    Lightning's launcher sets LOCAL_RANK & co. in this process; the next job of a sweep run here would take them
    for an external launcher's, and the old process group is dead.
    """
    saved = {k: os.environ.get(k) for k in _LIGHTNING_LAUNCHER_VARIABLES}
    try:
        yield
    finally:
        import torch.distributed

        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
