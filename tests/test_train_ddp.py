"""DDP: 2 CPU processes (gloo) train 3 steps into ONE run folder with ONE checkpoint."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def test_ddp_two_cpu_processes_share_one_run_folder(tmp_path):
    logs = tmp_path / "logs"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCHELASTIC", "EDMLAB_RUN"))}
    env.update({"WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    args = ["trainer=ddp_cpu", "trainer.devices=2", "trainer.max_steps=3", "trainer.log_every_n_steps=1",
            "network.model_channels=8", "network.channel_mult=[1,1]", "network.num_blocks=1",
            "data.batch_size=16",
            "logger=csv", "extras.print_config=false", "callbacks.sample_grid.every_kimg=0.032",
            "callbacks.sample_grid.per_class=1", "callbacks.sample_grid.scale=1", f"paths.log_dir={logs}"]
    done = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-6000:]
    runs = list((logs / "train" / "runs").iterdir())
    assert len(runs) == 1, runs  # not one folder per rank
    run = runs[0]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt", "last_ema.pt"]
    assert sorted(p.name for p in run.glob("*.log")) == ["train.log", "train_ddp_process_1.log"]
    assert (run / ".hydra" / "config.yaml").is_file() and (run / "samples.png").is_file()
    assert len(list((run / "samples").glob("*.png"))) == 1  # the grid at 32 images: rank 0 only
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 3
    # the global batch stays 16: 2 ranks x 8, and 3 steps consumed 48 images of the shared data order
    assert ckpt["ImageDataModule"]["images"] == 48 and ckpt["edmlab"]["batch_size"] == 16
    streams = ckpt["edmlab"]["rng"]
    assert len(streams) == 2 and not torch.equal(streams[0]["torch"], streams[1]["torch"])  # per-rank RNG


def test_ddp_multirun_gives_each_job_its_own_two_ranks(tmp_path):
    """A sweep in one process (Hydra's basic launcher): each job starts its own 2 ranks in its own folder."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCHELASTIC", "EDMLAB_RUN"))}
    env.update({"WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    sweep = tmp_path / "sweep"
    args = ["-m", "trainer=ddp_cpu", "trainer.devices=2", "optim.lr=1e-3,2e-3", "trainer.max_steps=2",
            "network.model_channels=8", "network.channel_mult=[1,1]", "network.num_blocks=1",
            "data.batch_size=16", "logger=csv", "extras.print_config=false",
            "callbacks.sample_grid=null", f"hydra.sweep.dir={sweep}"]
    done = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-6000:]
    for job, lr in (("0", 1e-3), ("1", 2e-3)):
        ckpt = torch.load(sweep / job / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        assert ckpt["global_step"] == 2 and ckpt["edmlab"]["config"]["optim"]["lr"] == lr
        assert len(ckpt["edmlab"]["rng"]) == 2  # both ranks trained this job
        assert (sweep / job / "train_ddp_process_1.log").is_file()
    assert sorted(p.name for p in sweep.iterdir()) == ["0", "1", "multirun.yaml"]
