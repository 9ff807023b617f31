"""Run folders: unique even for runs started in the same second; a folder in use refuses a second run; the
run's log file and console carry each line once."""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_train import compose_cfg, tiny

from edmlab.cli import resolvers
from edmlab.cli.runlock import LOCK_NAME, RunDirInUse, lock_run_dir, unlock_run_dir
from edmlab.cli.train import train

ROOT = Path(__file__).resolve().parents[1]
TOY = ["experiment=toy2d", "network.hidden_channels=16", "network.num_blocks=1", "data.dataset.n=64",
       "data.batch_size=8", "logger=csv", "extras.print_config=false", "callbacks.sample_grid=null",
       "trainer.max_steps=2"]
HOLD = ("import sys; from edmlab.cli.runlock import lock_run_dir; lock_run_dir(sys.argv[1]); "
        "print('held', flush=True); sys.stdin.read()")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCHELASTIC", "EDMLAB_"))}
    env.update({"WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")})
    return env


def test_same_second_gets_a_suffix_and_the_same_process_keeps_its_name(tmp_path, monkeypatch):
    class Frozen(datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(2026, 1, 2, 3, 4, 5)

    monkeypatch.setattr(resolvers.datetime, "datetime", Frozen)
    monkeypatch.setattr(resolvers, "_stamps", {})
    first = resolvers.run_stamp(str(tmp_path))
    assert first == "2026-01-02_03-04-05" and resolvers.run_stamp(str(tmp_path)) == first
    monkeypatch.setattr(resolvers, "_stamps", {})  # as another process would start
    assert resolvers.run_stamp(str(tmp_path)) == "2026-01-02_03-04-05-1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["2026-01-02_03-04-05", "2026-01-02_03-04-05-1"]


def test_two_runs_started_together_get_their_own_folders(tmp_path):
    procs = [subprocess.Popen([sys.executable, str(ROOT / "train.py"), *TOY, f"paths.log_dir={tmp_path}",
                               f"optim.lr={lr}"], cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for lr in (1e-3, 2e-3)]
    errs = [p.communicate(timeout=600)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e[-2000:] for e in errs]
    runs = sorted((tmp_path / "toy2d" / "runs").iterdir())
    assert len(runs) == 2
    lrs = sorted((run / ".hydra" / "config.yaml").read_text().split("lr: ")[1].split()[0] for run in runs)
    assert lrs == ["0.001", "0.002"]  # each folder's .hydra/ describes its own run
    assert all((run / "checkpoints" / "last.ckpt").is_file() for run in runs)


def test_each_lightning_line_is_printed_once_and_lands_in_the_run_log(tmp_path):
    env = {**_env(), "EDMLAB_RUN_STAMP": "quiet", "PYTHONWARNINGS": "default"}
    done = subprocess.run([sys.executable, str(ROOT / "train.py"), *TOY, f"paths.log_dir={tmp_path}"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    console = done.stdout + done.stderr
    assert console.count("GPU available: False") == 1, console[-3000:]
    assert console.count("`Trainer.fit` stopped") == 1
    run_log = (tmp_path / "toy2d" / "runs" / "quiet" / "toy2d.log").read_text()
    assert "GPU available: False" in run_log and "`Trainer.fit` stopped" in run_log
    assert "litlogger" not in console and "LeafSpec" not in console


def test_second_run_on_a_folder_in_use_refuses_naming_the_first(tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], env=_env(), stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirInUse, match=f"is in use by pid {holder.pid} on "):
            train(compose_cfg(tmp_path, tiny("digits_edm")))  # paths.output_dir = tmp_path / "run"
        done = subprocess.run([sys.executable, str(ROOT / "train.py"), *TOY, f"hydra.run.dir={run}"], cwd=ROOT,
                              env=_env(), capture_output=True, text=True, timeout=600)
        assert done.returncode != 0
        assert f"in use by pid {holder.pid}" in done.stderr
        assert not (run / ".hydra").exists() and not (run / "checkpoints").exists()  # nothing of it overwritten
    finally:
        holder.communicate("")  # ends the holder: the kernel drops its lock
    lock_run_dir(run)  # free again
    assert f"pid {os.getpid()} " in (run / LOCK_NAME).read_text()
    unlock_run_dir(run)
