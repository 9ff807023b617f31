"""Kill and resume : SIGKILL after the first checkpoint, ckpt_path=last, the same losses."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from edmlab.checkpoints import EXPORT_NAME, saved_step

ROOT = Path(__file__).resolve().parents[1]
# digits with dropout and EDM augmentation on: every random draw of a step (sigma, augmentation, noise,
# dropout) must be replayed after the resume
TINY = ["experiment=digits_edm", "network.model_channels=8", "network.channel_mult=[1,1]",
        "network.num_blocks=1", "network.dropout=0.2",
        "model.augment_pipe={_target_:edmlab.data.AugmentPipe,p:0.5}", "data.batch_size=16", "logger=csv",
        "trainer.log_every_n_steps=1", "extras.print_config=false", "callbacks.sample_grid=null",
        "model.lr_rampup_kimg=0.05", "model.ema_halflife_kimg=0.1",
        "callbacks.checkpoint.every_kimg=0.064"]  # a checkpoint every 4 steps


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCHELASTIC", "EDMLAB_RUN"))}
    env.update({"WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra})
    return env


def _cmd(*args: str) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), *TINY, *args]


def _losses(run: Path) -> dict[int, str]:
    """step -> train/loss exactly as logged (the CSV holds the float's repr)."""
    with open(run / "csv" / "metrics.csv") as f:
        return {int(row["step"]): row["train/loss"] for row in csv.DictReader(f) if row.get("train/loss")}


def _run_folder(log_dir: Path, stamp: str) -> Path:
    return log_dir / "digits_edm" / "runs" / stamp


def test_sigkill_then_resume_repeats_the_uninterrupted_losses(tmp_path):
    logs = tmp_path / "logs"
    # killed hard (no handler runs) as soon as its first checkpoint exists
    victim = subprocess.Popen(_cmd("trainer.max_steps=100000", f"paths.log_dir={logs}"), cwd=ROOT,
                              env=_env(EDMLAB_RUN_STAMP="killed"), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    ckpt = _run_folder(logs, "killed") / "checkpoints" / "last.ckpt"
    try:
        deadline = time.time() + 600  # generous: the machine may be loaded; the test waits for a state
        while not ckpt.exists() and victim.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert ckpt.exists(), f"no checkpoint before the deadline (exit {victim.poll()})"
    finally:
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=30)
    assert victim.returncode == -signal.SIGKILL
    killed_at = saved_step(ckpt)
    assert killed_at is not None and killed_at > 0 and killed_at % 4 == 0, killed_at
    # whatever the kill interrupted (maybe a .tmp), the files under the final names are complete, and the
    # export is from the checkpoint's step or (killed between the two renames) from the next save's
    export_step = saved_step(ckpt.parent / EXPORT_NAME)
    assert export_step is not None and export_step >= killed_at, (export_step, killed_at)
    steps = killed_at + 6

    # the reference: one uninterrupted run of the same command
    done = subprocess.run(_cmd(f"trainer.max_steps={steps}", f"paths.log_dir={tmp_path / 'ref'}"), cwd=ROOT,
                          env=_env(EDMLAB_RUN_STAMP="ref"), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    reference = _losses(_run_folder(tmp_path / "ref", "ref"))
    assert sorted(reference) == list(range(steps))

    # resumed with ckpt_path=last: the newest run of this task with a last.ckpt, i.e. the killed one
    done = subprocess.run(_cmd(f"trainer.max_steps={steps}", "ckpt_path=last", f"paths.log_dir={logs}"),
                          cwd=ROOT, env=_env(EDMLAB_RUN_STAMP="resumed"), capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    assert f"resuming from {ckpt} (step {killed_at}" in done.stdout + done.stderr
    resumed = _losses(_run_folder(logs, "resumed"))
    assert sorted(resumed) == list(range(killed_at, steps))
    assert resumed == {step: reference[step] for step in resumed}  # bit-identical, step for step
    assert saved_step(ckpt.parent / EXPORT_NAME) == killed_at  # the resume made the killed run's pair one step
    final = torch.load(_run_folder(logs, "resumed") / "checkpoints" / "last.ckpt", weights_only=True)
    assert final["global_step"] == steps and final["ImageDataModule"]["images"] == steps * 16


def test_sigterm_saves_and_stops_cleanly(tmp_path):
    run = tmp_path / "run"
    grid = ["callbacks.sample_grid.every_kimg=null", "callbacks.sample_grid.per_class=1",
            "callbacks.sample_grid.num_unconditional=4", "callbacks.sample_grid.scale=1"]  # only at the end
    cmd = [a for a in _cmd("trainer.max_steps=100000", "callbacks.checkpoint.every_kimg=null",
                           "callbacks.progress.print_every_seconds=0", "model.lr_rampup_kimg=0", *grid,
                           f"hydra.run.dir={run}") if a != "callbacks.sample_grid=null"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    try:
        for line in proc.stdout:  # one status line per step (print_every_seconds=0)
            lines.append(line)
            if " step 3 " in line:
                break
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = "".join(lines) + out
    assert proc.returncode == 0, out[-4000:]
    assert "received SIGTERM" in out
    saved = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert 3 <= saved["global_step"] < 100000
    assert (run / "checkpoints" / "last_ema.pt").is_file()
    # a stopped run skips the end-of-run grid (and the final losses): the job should exit now
    assert not (run / "samples.png").exists() and not (run / "samples").exists()


def test_restart_in_its_own_folder_resumes_without_ckpt_path(tmp_path):
    """A requeued job (same run folder, no ckpt_path) continues from its own last.ckpt, not from scratch."""
    logs = tmp_path / "logs"
    env = _env(EDMLAB_RUN_STAMP="requeued")
    first = subprocess.run(_cmd("trainer.max_steps=4", f"paths.log_dir={logs}"), cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    ckpt = _run_folder(logs, "requeued") / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"] == 4
    second = subprocess.run(_cmd("trainer.max_steps=6", f"paths.log_dir={logs}"), cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "resuming it" in second.stdout + second.stderr
    assert torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"] == 6


def test_last_never_picks_another_runs_checkpoint_inside_a_sweep(tmp_path):
    from edmlab.checkpoints import resolve

    other = tmp_path / "runs" / "other" / "checkpoints"
    other.mkdir(parents=True)
    (other / "last.ckpt").write_bytes(b"x")
    mine = tmp_path / "multiruns" / "0"
    mine.mkdir(parents=True)
    runs = tmp_path / "runs"
    assert resolve("last", training=True, runs_dir=runs, output_dir=mine) == other / "last.ckpt"
    assert resolve("last", training=True, runs_dir=runs, output_dir=mine, own_only=True) is None
