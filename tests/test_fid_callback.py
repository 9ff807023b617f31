"""FID during training: EDM's per-seed samples, cached reference statistics, the same value on 1 and 2 ranks."""

from __future__ import annotations

import functools
import os
import socket
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from edmlab.data import ArrayImageDataset
from edmlab.generation import generate_batch, to_uint8, with_precision
from edmlab.metrics.fid import frechet_distance
from edmlab.networks import build
from edmlab.precond import Denoiser
from edmlab.sampling import sample
from edmlab.training.fid import FIDCallback, reference_stats, sample_stats

HEUN = functools.partial(sample, num_steps=3)


class PixelFeatures(torch.nn.Module):
    """Stand-in for Inception: 4x4 average-pooled pixels and their squares (32-d), fast and deterministic."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(images.float() / 255, 4).flatten(1)
        return torch.cat([x, x.square()], 1)


def tiny_denoiser(label_dim: int = 3) -> Denoiser:
    torch.manual_seed(0)
    net = build("ddpmpp", img_resolution=8, img_channels=1, label_dim=label_dim, model_channels=8,
                channel_mult=[1, 2], num_blocks=1, attn_resolutions=[], dropout=0.0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return Denoiser(net).to(torch.float64).eval()


def real_images(n: int = 40) -> ArrayImageDataset:
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (n, 1, 8, 8), generator=g, dtype=torch.uint8).numpy()
    return ArrayImageDataset(images, np.arange(n) % 3, label_dim=3, name="random 8x8")


def direct_fid(denoiser, dataset, seeds, batch: int, sampler=HEUN) -> float:
    """The same FID by hand: EDM's seeds, uint8 images, np.cov statistics of the stand-in features."""
    feats = PixelFeatures()
    images = torch.cat([to_uint8(generate_batch(denoiser, seeds[i:i + batch], sampler)[0])
                        for i in range(0, len(seeds), batch)])
    a = feats(images).double().numpy()
    b = feats(torch.from_numpy(dataset.images)).double().numpy()
    return frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))


class RecordingLogger:
    def __init__(self) -> None:
        self.logged: list[tuple[dict, int]] = []

    def log_metrics(self, metrics: dict, step: int) -> None:
        self.logged.append((metrics, step))


def fake_run(dataset, denoiser, loggers, step: int = 0):
    trainer = SimpleNamespace(global_step=step, loggers=loggers, callback_metrics={}, is_global_zero=True, callbacks=[],
                              datamodule=SimpleNamespace(base_dataset=dataset))
    module = SimpleNamespace(ema=SimpleNamespace(module=denoiser), batch_size=16, device=torch.device("cpu"))
    return trainer, module


def test_callback_logs_the_fid_of_per_seed_samples_and_caches_the_reference(tmp_path):
    dataset, denoiser = real_images(), tiny_denoiser()
    loggers = [RecordingLogger(), RecordingLogger()]
    ref = tmp_path / "refs" / "ref.npz"
    cb = FIDCallback(HEUN, every_kimg=0.032, num=12, ref=ref, batch_size=5, seed=3, detector=PixelFeatures())
    trainer, module = fake_run(dataset, denoiser, loggers)
    cb.on_train_start(trainer, module)
    trainer.global_step = 1  # 16 images: no multiple of 32 crossed
    cb.on_train_batch_end(trainer, module, None, None, 0)
    assert all(not lg.logged for lg in loggers) and not ref.exists()
    trainer.global_step = 2  # 32 images: the first evaluation
    cb.on_train_batch_end(trainer, module, None, None, 1)
    expected = direct_fid(denoiser, dataset, list(range(3, 15)), batch=5)
    for lg in loggers:
        (metrics, step), = lg.logged
        assert step == 2 and set(metrics) == {"fid/12"}
        np.testing.assert_allclose(metrics["fid/12"], expected, rtol=1e-7)  # float32 features
    assert ref.is_file()  # computed once, cached
    cb.on_train_end(trainer, module)  # same step: no second evaluation, final/fid is that value
    assert len(loggers[0].logged) == 1 and float(trainer.callback_metrics["final/fid"]) == metrics["fid/12"]

    # a new run reads the cached reference and never touches the training images
    class Untouchable(ArrayImageDataset):
        def __getitem__(self, index):
            raise AssertionError("reference recomputed")

    fresh = Untouchable(dataset.images, dataset.raw_labels, label_dim=3)
    cb2 = FIDCallback(HEUN, every_kimg=None, num=12, ref=ref, batch_size=5, seed=3, detector=PixelFeatures())
    trainer2, module2 = fake_run(fresh, denoiser, [RecordingLogger()], step=7)
    cb2.on_train_end(trainer2, module2)
    assert float(trainer2.callback_metrics["final/fid"]) == metrics["fid/12"]


def _rank_main(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        ref = reference_stats(real_images(), PixelFeatures(), num=33, batch_size=4, rank=rank, world=world)
        stats = sample_stats(tiny_denoiser(), HEUN, PixelFeatures(), range(10), batch_size=3, rank=rank,
                             world=world)
        np.savez(f"{out}-{rank}.npz", ref_mu=ref.mu, ref_sigma=ref.sigma, mu=stats.mu, sigma=stats.sigma,
                 fid=frechet_distance(stats.mu, stats.sigma, ref.mu, ref.sigma))
    finally:
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_same_statistics_and_fid_on_one_and_two_gloo_ranks(tmp_path):
    mp.spawn(_rank_main, args=(2, _free_port(), str(tmp_path / "two")), nprocs=2, join=True)
    ref = reference_stats(real_images(), PixelFeatures(), num=33, batch_size=4)
    stats = sample_stats(tiny_denoiser(), HEUN, PixelFeatures(), range(10), batch_size=3)
    single = frechet_distance(stats.mu, stats.sigma, ref.mu, ref.sigma)
    assert ref.num == 33 and stats.num == 10 and single > 0
    for rank in range(2):
        with np.load(tmp_path / f"two-{rank}.npz") as f:
            # same chunks, gathered and accumulated in chunk order: bit-identical statistics on every rank
            np.testing.assert_array_equal(f["ref_mu"], ref.mu)
            np.testing.assert_array_equal(f["ref_sigma"], ref.sigma)
            np.testing.assert_array_equal(f["mu"], stats.mu)
            np.testing.assert_array_equal(f["sigma"], stats.sigma)
            assert float(f["fid"]) == single


def test_configs_fid_off_for_digits_on_for_fashion_edm():
    from pathlib import Path

    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    import edmlab.cli  # noqa: F401 - the resolvers the configs use

    configs = Path(__file__).resolve().parents[1] / "configs"
    with initialize_config_dir(config_dir=str(configs), version_base="1.3"):
        digits = compose("train", overrides=["paths.output_dir=/tmp/x"])
        fashion = compose("train", overrides=["experiment=fashion_edm", "paths.output_dir=/tmp/x"])
    assert "fid" not in digits.callbacks
    assert fashion.data.dataset._target_ == "edmlab.data.IdxDataset" and fashion.network.label_dropout > 0
    assert fashion.model.ema_halflife_kimg == 50  # the experiment, not the defaults
    cb = instantiate(fashion.callbacks.fid)  # no weights are loaded before the first evaluation
    assert isinstance(cb, FIDCallback) and cb.key == "fid/1000" and cb.every_kimg == 500 and cb.detector is None
    assert cb.sampler.keywords["solver"] == "heun" and cb.sampler.keywords["num_steps"] == 18


@pytest.mark.slow
def test_train_py_logs_fid_and_returns_final_fid(tmp_path):
    """The callback in a real run: digits, csv logger, fid/<num> in metrics.csv, final/fid for the sweepers."""
    import csv
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCHELASTIC", "EDMLAB_RUN"))}
    env.update(WANDB_MODE="disabled", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(root / "tests"), env.get("PYTHONPATH", "")]))
    run = tmp_path / "run"
    args = ["callbacks=fid", "callbacks.fid.num=16", "callbacks.fid.every_kimg=0.064", "callbacks.fid.batch_size=8",
            f"callbacks.fid.ref={tmp_path}/ref.npz", "+callbacks.fid.detector._target_=test_fid_callback.PixelFeatures",
            "trainer.max_steps=6", "data.batch_size=16", "network.model_channels=8", "network.channel_mult=[1,1]",
            "network.num_blocks=1", "sampler.num_steps=2", "logger=csv", "callbacks.sample_grid=null",
            "extras.print_config=false", "+optimized_metric=final/fid",
            f"hydra.run.dir={run}"]
    done = subprocess.run([sys.executable, str(root / "train.py"), *args], cwd=root, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    rows = list(csv.DictReader(open(run / "csv" / "metrics.csv")))
    fids = [(int(r["step"]), float(r["fid/16"])) for r in rows if r.get("fid/16")]
    assert [s for s, _ in fids] == [4, 6]  # at 64 images and at the end (96 images)
    assert all(np.isfinite(v) and v > 0 for _, v in fids) and (tmp_path / "ref.npz").is_file()


def test_guided_fid_is_the_fid_of_guided_samples(tmp_path):
    from edmlab.guidance import guided

    dataset, denoiser = real_images(), tiny_denoiser()
    cb = FIDCallback(HEUN, every_kimg=None, num=12, ref=tmp_path / "ref.npz", batch_size=5, seed=3,
                     detector=PixelFeatures(), guidance=2.0, guidance_interval=(0.1, 10.0))
    trainer, module = fake_run(dataset, denoiser, [RecordingLogger()])
    fid = cb.score(trainer, module)
    expected = direct_fid(guided(denoiser, 2.0, interval=(0.1, 10.0)), dataset, list(range(3, 15)), batch=5)
    np.testing.assert_allclose(fid, expected, rtol=1e-7)
    assert fid != pytest.approx(direct_fid(denoiser, dataset, list(range(3, 15)), batch=5), rel=1e-3)


def test_bf16_fid_is_the_fid_of_bf16_samples(tmp_path):
    dataset, denoiser = real_images(), tiny_denoiser()
    cb = FIDCallback(HEUN, every_kimg=None, num=12, ref=tmp_path / "ref.npz", batch_size=5, seed=3,
                     detector=PixelFeatures(), precision="bf16")
    fid = cb.score(*fake_run(dataset, denoiser, [RecordingLogger()]))
    bf16 = with_precision(HEUN, "cpu", "bf16")
    np.testing.assert_allclose(fid, direct_fid(denoiser, dataset, list(range(3, 15)), 5, bf16), rtol=1e-7)
    assert fid != direct_fid(denoiser, dataset, list(range(3, 15)), batch=5)  # the samples were bf16's


def test_fid_settings_are_checked_at_start_up(tmp_path, monkeypatch):
    from edmlab.metrics.inception import InceptionWeightsError

    for bad in (dict(batch_size=0), dict(every_kimg=0), dict(num=1), dict(precision="fp16")):
        with pytest.raises(ValueError, match=next(iter(bad))):
            FIDCallback(HEUN, **bad)
    unconditional = SimpleNamespace(label_dim=0)
    with pytest.raises(ValueError, match="guidance=2 needs a class-conditional model"):
        FIDCallback(HEUN, guidance=2.0, detector=PixelFeatures()).check_settings(unconditional)
    monkeypatch.setenv("EDMLAB_INCEPTION", str(tmp_path / "missing.pt"))
    with pytest.raises(InceptionWeightsError, match="missing.pt"):
        FIDCallback(HEUN).check_settings(SimpleNamespace(label_dim=3))
    FIDCallback(HEUN, detector=PixelFeatures()).check_settings(SimpleNamespace(label_dim=3))  # a given detector
