"""This process's rank and the world size, read once from the launcher's environment: edmlab's one rank source."""

from __future__ import annotations

import os
from collections.abc import Mapping

__all__ = ["distributed_env", "global_rank", "world_size"]


def _env_int(environ: Mapping[str, str], *names: str) -> int | None:
    for name in names:
        value = environ.get(name, "")
        if value.strip().isdigit():
            return int(value)
    return None


def distributed_env(environ: Mapping[str, str] | None = None) -> tuple[int, int]:
    """(rank, world size) from torchrun (RANK/WORLD_SIZE), SLURM srun, or Lightning's launcher; (0, 1) alone."""
    env = os.environ if environ is None else environ
    world = _env_int(env, "WORLD_SIZE")
    rank = _env_int(env, "RANK")
    if world is not None and rank is not None:
        pass
    elif _env_int(env, "SLURM_NTASKS") is not None and _env_int(env, "SLURM_PROCID") is not None:
        rank, world = _env_int(env, "SLURM_PROCID"), _env_int(env, "SLURM_NTASKS")
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
    """This process's rank as set by the launcher (torchrun, SLURM srun, Lightning), 0 if none."""
    return distributed_env(environ)[0]


def world_size(environ: Mapping[str, str] | None = None) -> int:
    """The number of processes of this job as set by the launcher, 1 if none."""
    return distributed_env(environ)[1]
