"""last.ckpt and last_ema.pt: a SIGKILL at any point of a save leaves a usable pair; start-up makes it one step."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from edmlab.checkpoints import EXPORT_NAME, saved_step
from edmlab.training.checkpoint import SAVE_POINTS, sync_export

ROOT = Path(__file__).resolve().parents[1]
# a checkpoint after every step of 8 points: save n holds step n
TOY = ["experiment=toy2d", "network.hidden_channels=16", "network.num_blocks=1", "data.dataset.n=64",
       "data.batch_size=8", "logger=csv", "extras.print_config=false", "callbacks.sample_grid=null",
       "callbacks.checkpoint.every_kimg=0.008", "callbacks.progress.print_every_seconds=1000"]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCHELASTIC", "EDMLAB_"))}
    env.update({"WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src"), **extra})
    return env


def _train(run: Path, *args: str, **env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *TOY, f"hydra.run.dir={run}", *args],
                            cwd=ROOT, env=_env(**env), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _pair(folder: Path) -> tuple[int | None, int | None]:
    """(step of last.ckpt, step of last_ema.pt); None where the file is absent."""
    ckpt, export = folder / "last.ckpt", folder / EXPORT_NAME
    return (saved_step(ckpt) if ckpt.exists() else None), (saved_step(export) if export.exists() else None)


def _check_usable(folder: Path) -> tuple[int | None, int | None]:
    """The invariant right after a kill: a last.ckpt always has a complete export from its step or later."""
    ckpt_step, export_step = _pair(folder)
    if ckpt_step is not None:
        assert export_step is not None and export_step >= ckpt_step, (ckpt_step, export_step)
    if (folder / EXPORT_NAME).exists():
        assert export_step is not None  # complete: it records its step
    return ckpt_step, export_step


def _export_is_the_ema_of(folder: Path) -> None:
    from edmlab.checkpoints import load_any, load_denoiser

    exported, rebuilt = load_denoiser(folder / EXPORT_NAME), load_any(folder / "last.ckpt").denoiser
    for (name, a), (_, b) in zip(exported.state_dict().items(), rebuilt.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


# point @ save -> (step of last.ckpt, step of last_ema.pt) the kill leaves
EXPECTED = {("ckpt_tmp", 1): (None, None), ("export", 1): (None, 1), ("ckpt", 1): (1, 1),
            ("ckpt_tmp", 2): (1, 1), ("export", 2): (1, 2), ("ckpt", 2): (2, 2)}
# One interpreter pays the imports once; each fault runs in a forked child (one thread: fork-safe) that
# trains through edmlab.cli.train.train and SIGKILLs itself at its point.
FORKED_RUNS = r"""
import json, os, sys
import torch
torch.set_num_threads(1)
from hydra import compose, initialize_config_dir
from edmlab.cli.train import CONFIG_DIR, train
from edmlab.training.checkpoint import FAULT_ENV
root, toy, specs = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3:]
status = {}
for spec in specs:
    run = os.path.join(root, spec.replace("@", ""))
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[*toy, f"paths.output_dir={run}", f"paths.log_dir={root}/logs",
                                          "trainer.max_steps=100"])
    pid = os.fork()
    if pid == 0:
        os.environ[FAULT_ENV] = spec
        try:
            train(cfg)
        finally:
            os._exit(3)
    status[spec] = os.waitpid(pid, 0)[1]
print(json.dumps(status))
"""


def test_kill_right_after_each_write_and_rename_leaves_a_usable_pair_and_startup_repairs_it(tmp_path):
    import json

    assert {point for point, _ in EXPECTED} == set(SAVE_POINTS)
    specs = [f"{point}@{n}" for point, n in EXPECTED]
    done = subprocess.run([sys.executable, "-c", FORKED_RUNS, str(tmp_path), json.dumps(TOY), *specs], cwd=ROOT,
                          env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    status = json.loads(done.stdout.strip().splitlines()[-1])
    assert all(os.WIFSIGNALED(s) and os.WTERMSIG(s) == signal.SIGKILL for s in status.values()), status
    for point, n in EXPECTED:
        folder = tmp_path / f"{point}{n}" / "checkpoints"
        assert _check_usable(folder) == EXPECTED[point, n], (point, n)
        if (point, n) == ("ckpt_tmp", 2):
            assert list(folder.glob(".last.ckpt.*.tmp")), "the kill should leave the temporary last.ckpt"
        repaired = sync_export(folder)
        assert repaired == ("regenerated" if (point, n) == ("export", 2) else
                            "ok" if EXPECTED[point, n][0] else "no checkpoint")
        assert not list(folder.glob(".*.tmp"))
        ckpt_step, export_step = _pair(folder)
        if ckpt_step is not None:
            assert export_step == ckpt_step
            _export_is_the_ema_of(folder)

    # an export from another step (or an older edmlab's, with no step) is rewritten from last.ckpt
    folder = tmp_path / "ckpt2" / "checkpoints"
    payload = torch.load(folder / EXPORT_NAME, weights_only=True)
    torch.save({**payload, "global_step": None}, folder / EXPORT_NAME)
    (folder / f".{EXPORT_NAME}.999999999.tmp").write_bytes(b"half")  # a dead writer's leftover
    assert sync_export(folder, create=False) == "regenerated"
    assert _pair(folder) == (2, 2) and not list(folder.glob(".*.tmp"))
    _export_is_the_ema_of(folder)
    (folder / EXPORT_NAME).unlink()
    assert sync_export(folder, create=False) == "no export"
    assert sync_export(folder) == "regenerated" and _pair(folder) == (2, 2)


@pytest.mark.slow
def test_twenty_sigkills_at_random_moments_leave_no_inconsistent_pair(tmp_path):
    """Kill a run that saves every step at a random moment, 20 times; each restart resumes its own folder."""
    run, rng = tmp_path / "run", random.Random(0)
    folder = run / "checkpoints"
    inconsistent, ahead, kills = 0, 0, 0
    for _ in range(20):
        before = (folder / "last.ckpt").stat().st_mtime_ns if (folder / "last.ckpt").exists() else None
        proc = _train(run, "trainer.max_steps=100000")
        deadline = time.time() + 300
        while proc.poll() is None and time.time() < deadline and (  # until this process has saved once
                not (folder / "last.ckpt").exists() or (folder / "last.ckpt").stat().st_mtime_ns == before):
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 1.5))
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=120)
        kills += proc.returncode == -signal.SIGKILL
        ckpt_step, export_step = _check_usable(folder)
        ahead += export_step != ckpt_step
        sync_export(folder)
        inconsistent += len(set(_pair(folder))) != 1
    assert kills == 20 and inconsistent == 0, (kills, inconsistent, ahead)
