"""edmlab.dist, the one rank source: rank, world size and local rank under every launcher; who launched us."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from edmlab.cli import resolvers
from edmlab.dist import LaunchInfo, distributed_env, launch_info, local_rank, scoped_launch

SRC = Path(__file__).resolve().parents[1] / "src" / "edmlab"


def test_distributed_env():
    assert distributed_env({}) == (0, 1)
    assert distributed_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == (3, 4)  # torchrun
    assert distributed_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "8"}) == (5, 8)  # srun
    assert distributed_env({"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4"}) == (2, 4)  # Open MPI
    assert distributed_env({"PMI_RANK": "1", "PMI_SIZE": "3"}) == (1, 3)  # MPICH / Intel MPI
    assert distributed_env({"LOCAL_RANK": "1", "WORLD_SIZE": "2"}) == (1, 2)  # Lightning, one node
    assert distributed_env({"LOCAL_RANK": "1", "NODE_RANK": "1", "LOCAL_WORLD_SIZE": "2", "WORLD_SIZE": "4"}) == (3, 4)
    # `srun torchrun`: torchrun's ranks, not the one Slurm task per node
    assert distributed_env({"RANK": "13", "WORLD_SIZE": "16", "SLURM_PROCID": "1", "SLURM_NTASKS": "2"}) == (13, 16)
    assert distributed_env({"PMI_RANK": "1"}) == (0, 1)  # a rank without a size is no launcher
    with pytest.raises(RuntimeError, match="not in"):
        distributed_env({"RANK": "2", "WORLD_SIZE": "2"})


def test_local_rank_follows_the_launcher():
    assert local_rank({}) == 0
    assert local_rank({"SLURM_LOCALID": "3"}) == 3  # srun
    assert local_rank({"LOCAL_RANK": "1", "SLURM_LOCALID": "0"}) == 1  # `srun torchrun`: torchrun's
    assert local_rank({"OMPI_COMM_WORLD_LOCAL_RANK": "2"}) == 2
    assert local_rank({"MPI_LOCALRANKID": "5"}) == 5


def test_launch_info_torchrun_wins_over_slurm():
    slurm = {"SLURM_JOB_ID": "9", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "16", "SLURM_NNODES": "2",
             "SLURM_NTASKS_PER_NODE": "8", "SLURM_NODEID": "1", "SLURM_PROCID": "11", "SLURM_JOB_NAME": "train"}
    assert launch_info(slurm) == LaunchInfo("slurm", 16, 2, 8, 1, 11)
    # `srun torchrun --nproc-per-node=8` on 2 nodes: one Slurm task per node, torchrun's ranks inside
    torchrun = {**slurm, "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "1", "TORCHELASTIC_RUN_ID": "abc",
                "WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8", "GROUP_RANK": "1", "RANK": "13"}
    assert launch_info(torchrun) == LaunchInfo("torchrun", 16, 2, 8, 1, 13)
    assert launch_info({"SLURM_JOB_ID": "9", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "1",
                        "SLURM_JOB_NAME": "bash"}).launcher == "local"  # an interactive shell
    assert launch_info({}).launcher == "local"


def test_scoped_launch_undoes_what_lightnings_launcher_set(monkeypatch):
    monkeypatch.setenv("MASTER_PORT", "1234")
    for name in ("LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "MASTER_ADDR"):
        monkeypatch.delenv(name, raising=False)
    with scoped_launch():
        os.environ.update(LOCAL_RANK="0", WORLD_SIZE="2", NODE_RANK="0", MASTER_PORT="5678")
        assert distributed_env() == (0, 2)
    assert "LOCAL_RANK" not in os.environ and "WORLD_SIZE" not in os.environ and "NODE_RANK" not in os.environ
    assert os.environ["MASTER_PORT"] == "1234" and distributed_env() == (0, 1)


def test_run_folder_resolvers_take_the_rank_from_dist(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PMI_RANK", "2")
    monkeypatch.setenv("PMI_SIZE", "4")
    assert resolvers._job_name("train") == "train_rank2"  # its own log file
    assert resolvers._output_subdir(".hydra") is None  # only rank 0 writes .hydra/
    monkeypatch.setenv("PMI_RANK", "0")
    assert resolvers._job_name("train") == "train"


def test_no_module_but_dist_reads_rank_variables():
    pattern = re.compile(r"""["'](RANK|LOCAL_RANK|WORLD_SIZE|NODE_RANK|GROUP_RANK|SLURM_PROCID|SLURM_LOCALID|"""
                         r"""PMI_RANK|OMPI_COMM_WORLD_\w+)["']""")
    readers = sorted(str(p.relative_to(SRC)) for p in SRC.rglob("*.py")
                     if p.name != "dist.py" and pattern.search(p.read_text()))
    assert readers == []
