"""Nothing lost, nothing silent: Ctrl-C saves, requeue is on under Slurm, CSV history survives, divergence stops."""

from __future__ import annotations

import csv
import os
import signal
import tracemalloc

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from test_train import compose_cfg, tiny

from edmlab.checkpoints import EXPORT_NAME, saved_step
from edmlab.cli.train import _make_trainer, main, train
from edmlab.cluster import Requeue
from edmlab.training.checkpoint import StreamingCheckpointIO

BASE = [*tiny("digits_edm"), "callbacks.sample_grid=null", "model.lr_rampup_kimg=0"]


class SendSignal(L.Callback):
    """Sends `signal` to this process once, at the end of step `at_step` (what Ctrl-C or Slurm would do)."""

    def __init__(self, signal: str, at_step: int) -> None:
        self.signum, self.at_step = getattr(signal_module, signal), at_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.at_step:
            os.kill(os.getpid(), self.signum)


signal_module = signal
SEND = "+callbacks.send._target_=test_train_reliability.SendSignal"


def _rows(run) -> list[dict]:
    with open(run / "csv" / "metrics.csv") as f:
        return [r for r in csv.DictReader(f) if r.get("train/loss")]


def test_ctrl_c_saves_stops_and_exits_130(tmp_path):
    cfg = compose_cfg(tmp_path, [*BASE, "trainer.max_steps=50", "callbacks.checkpoint.every_kimg=null", SEND,
                                 "+callbacks.send.signal=SIGINT", "+callbacks.send.at_step=2"])
    with pytest.raises(SystemExit) as exit_:
        main.__wrapped__(cfg)
    assert exit_.value.code == 130
    folder = tmp_path / "run" / "checkpoints"
    assert saved_step(folder / "last.ckpt") == 3  # saved at the next step boundary, then stopped
    assert saved_step(folder / EXPORT_NAME) == 3
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored


def test_requeue_is_on_by_default_and_inert_outside_slurm(tmp_path, monkeypatch):
    for key in [k for k in os.environ if k.startswith("SLURM_") or k == "EDMLAB_REQUEUE_CMD"]:
        monkeypatch.delenv(key)
    cfg = compose_cfg(tmp_path, [*BASE, "trainer.max_steps=5", "callbacks.checkpoint.every_kimg=null", SEND,
                                 "+callbacks.send.signal=SIGUSR1", "+callbacks.send.at_step=2"])
    assert isinstance(instantiate(cfg.callbacks.requeue), Requeue)
    assert Requeue.active({}) is False and Requeue.active({"SLURM_JOB_ID": "7"}) is True
    result = train(cfg)  # outside Slurm SIGUSR1 saves and trains on: no requeue, no exit
    assert "stopped_by_signal" not in result
    assert saved_step(tmp_path / "run" / "checkpoints" / "last.ckpt") == 5


def test_resume_keeps_and_extends_the_csv_history(tmp_path):
    first = compose_cfg(tmp_path, [*BASE, "trainer.max_steps=4", "trainer.log_every_n_steps=1"])
    train(first)
    run = tmp_path / "run"
    assert [int(r["step"]) for r in _rows(run)] == [0, 1, 2, 3]
    with open(run / "csv" / "metrics.csv", "a") as f:  # steps an interrupted run logged after its checkpoint
        f.write("\n".join(",".join(["4" if k == "step" else "999" if k == "train/loss" else ""
                                    for k in _rows(run)[0]]) for _ in range(1)) + "\n")
    again = compose_cfg(tmp_path, [*BASE, "trainer.max_steps=6", "trainer.log_every_n_steps=1"])
    train(again)  # the same run folder: resumes its own last.ckpt
    rows = _rows(run)
    assert [int(r["step"]) for r in rows] == [0, 1, 2, 3, 4, 5]  # kept, extended, each step once
    assert all(r["train/loss"] != "999" for r in rows)


def test_divergence_stops_with_exit_1_and_keeps_the_last_healthy_checkpoint(tmp_path):
    cfg = compose_cfg(tmp_path, [*BASE, "optim.lr=1e3", "trainer.max_steps=200", "model.max_nonfinite_steps=5",
                                 "callbacks.checkpoint.every_kimg=0.008", "trainer.log_every_n_steps=1"])
    with pytest.raises(SystemExit) as exit_:
        main.__wrapped__(cfg)
    assert "training diverged: 5 consecutive steps had non-finite gradients" in str(exit_.value.code)
    assert "model.max_nonfinite_steps=5" in str(exit_.value.code)
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["edmlab"]["counters"]["skipped_steps"] == 0  # taken before any skipped step
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())
    steps = [int(r["step"]) for r in _rows(tmp_path / "run")]
    assert max(steps) < 20  # stopped early, not at max_steps


@pytest.mark.parametrize("override, message", [
    ("optim.lr=fast", "optim.lr='fast': expected a number (float), got str"),
    ("data.batch_size=eight", "data.batch_size='eight'"),
    ("sampler.num_steps=0", "sampler: num_steps must be an integer >= 1, got 0"),
    ("callbacks.sample_grid.sampler={_target_:edmlab.sampling.sample,_partial_:true,num_steps:0}",
     "callbacks.sample_grid.sampler: num_steps must be an integer"),
    ("sampler.sigma_min=100", "sampler: need 0 < sigma_min < sigma_max < inf, got sigma_min=100"),
    ("sampler.solver=hune", "sampler: unknown solver 'hune'; valid names: euler, heun"),
    ("callbacks.sample_grid.scale=0", "callbacks.sample_grid.scale=0: expected an integer >= 1"),
    ("callbacks.sample_grid.per_class=-1", "callbacks.sample_grid.per_class=-1: expected an integer >= 1"),
])
def test_bad_settings_fail_at_start_up_in_one_line_naming_the_key(tmp_path, override, message, monkeypatch):
    import lightning.pytorch

    def no_fit(*args, **kwargs):
        raise AssertionError("fit started")

    monkeypatch.setattr(lightning.pytorch.Trainer, "fit", no_fit)
    overrides = [*tiny("digits_edm"), "trainer.max_steps=1", "callbacks.sample_grid.every_kimg=32", override]
    with pytest.raises(SystemExit) as exit_:
        main.__wrapped__(compose_cfg(tmp_path, overrides))
    text = str(exit_.value.code)
    assert message in text and "\n" not in text.strip(), text


def test_resume_applies_a_new_lr_and_refuses_a_new_batch_size(tmp_path, caplog):
    train(compose_cfg(tmp_path, [*BASE, "trainer.max_steps=3", "optim.lr=1e-3"]))
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    with pytest.raises(SystemExit) as exit_:
        main.__wrapped__(compose_cfg(tmp_path, [*BASE, "trainer.max_steps=5", "data.batch_size=16"]))
    assert "cannot resume" in str(exit_.value.code) and "data.batch_size: checkpoint 8 vs this run 16" in \
        str(exit_.value.code)
    assert saved_step(ckpt) == 3  # untouched
    with caplog.at_level("WARNING", logger="edmlab.train"):
        train(compose_cfg(tmp_path, [*BASE, "trainer.max_steps=5", "optim.lr=2e-3", "model.lr_rampup_kimg=0.08"]))
    assert "optim.lr: checkpoint 0.001 vs this run 0.002" in caplog.text
    assert "model.lr_rampup_kimg: checkpoint 0 vs this run 0.08" in caplog.text
    state = torch.load(ckpt, weights_only=True)
    assert state["global_step"] == 5
    assert state["lr_schedulers"][0]["base_lrs"] == [2e-3]
    # the new ramp: lr for step 5 = 2e-3 x min(5 x 8 / 80, 1)
    assert state["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(2e-3 * 40 / 80)


def test_diagnostics_are_logged_on_the_loggers_steps_only(tmp_path, monkeypatch):
    """EMA, progress, gradient and per-sigma diagnostics reach the CSV on every log_every_n_steps-th step, exact."""
    cfg = compose_cfg(tmp_path, [*BASE, "trainer.max_steps=7", "trainer.log_every_n_steps=3",
                                 "callbacks.checkpoint.every_kimg=null"])
    calls: list[str] = []
    original = L.LightningModule.log

    def counting_log(self, name, *args, **kwargs):
        calls.append(name)
        return original(self, name, *args, **kwargs)

    monkeypatch.setattr(L.LightningModule, "log", counting_log)
    train(cfg)
    rows = {int(r["step"]): r for r in _rows(tmp_path / "run")}
    batch, rampup = cfg.data.batch_size, cfg.model.ema_rampup_ratio
    assert sorted(rows) == [2, 5]  # the 3rd and 6th steps
    for step, row in rows.items():
        nimg = step * batch  # before the step, as EDM's EMA ramp counts
        assert float(row["progress/kimg"]) == pytest.approx((nimg + batch) / 1000, rel=1e-6)  # logged as float32
        assert float(row["ema/beta"]) == pytest.approx(0.5 ** (batch / (nimg * rampup)), rel=1e-6)
        assert float(row["train/skipped_steps"]) == 0 and float(row["train/grad_norm"]) > 0
        assert float(row["progress/img_per_sec"]) > 0
        assert any(k.startswith("train/loss_sigma_") and row[k] for k in row)
    # off the log steps only the loss (progress bar) and the learning rate are logged
    assert calls.count("ema/beta") == 2 and calls.count("train/loss") == 7 and calls.count("train/lr") == 7


def test_checkpoints_stream_to_disk_without_a_serialized_copy_in_memory(tmp_path):
    """train.py's Trainer saves through StreamingCheckpointIO: the file loads back bit for bit, and no serialized
    copy of the checkpoint is held in Python memory (Lightning's own IO holds one, measured side by side)."""
    trainer = _make_trainer(compose_cfg(tmp_path, BASE), [], [])
    assert isinstance(trainer.strategy.checkpoint_io, StreamingCheckpointIO)
    size = 16 * 2**20
    checkpoint = {"state_dict": {f"w{i}": torch.randn(2**18) for i in range(16)}, "global_step": 3}  # 16 MiB
    peaks = {}
    for io in (TorchCheckpointIO(), trainer.strategy.checkpoint_io):
        tracemalloc.start()
        io.save_checkpoint(checkpoint, tmp_path / f"{type(io).__name__}.ckpt")
        peaks[type(io).__name__] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peaks["TorchCheckpointIO"] >= size and peaks["StreamingCheckpointIO"] < size / 64
    loaded = torch.load(tmp_path / "StreamingCheckpointIO.ckpt", weights_only=True)
    assert loaded["global_step"] == 3
    assert all(torch.equal(loaded["state_dict"][k], v) for k, v in checkpoint["state_dict"].items())
    assert [p.name for p in tmp_path.glob(".*.tmp")] == []  # written under a temporary name, renamed into place
