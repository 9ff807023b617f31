"""Per-seed generation: same bytes across batch sizes and ranks, resumable after a kill, every checkpoint kind."""

import functools
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from edmlab import checkpoints
from edmlab.checkpoints import load_any
from edmlab.generation import (
    batches_for_rank,
    generate,
    generate_batch,
    npz_name,
    parse_seeds,
    png_path,
    to_uint8,
)
from edmlab.networks import build
from edmlab.precond import Denoiser
from edmlab.sampling import sample

ROOT = Path(__file__).resolve().parents[1]
HEUN = functools.partial(sample, num_steps=3)
CHURN = functools.partial(sample, solver="edm_stochastic", num_steps=4, S_churn=20.0)  # draws per-seed noise


def tiny_denoiser(label_dim: int = 0, dtype: torch.dtype = torch.float32, seed: int = 0) -> Denoiser:
    """A two-level DDPM++ at 8x8x1 with every weight perturbed (the zero-initialised output gives D = c_skip x)."""
    torch.manual_seed(seed)
    net = build("ddpmpp", img_resolution=8, img_channels=1, label_dim=label_dim, model_channels=16,
                channel_mult=[1, 2], num_blocks=1, attn_resolutions=[], dropout=0.0)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return Denoiser(net).to(dtype).eval()


def pixels(images: torch.Tensor) -> np.ndarray:
    """uint8 [N, H, W, C] as the PNG and npz writers store them."""
    return to_uint8(images, channels_last=True).numpy()


def read_pngs(outdir: Path, seeds) -> np.ndarray:
    return np.stack([np.asarray(PIL.Image.open(png_path(outdir, s))) for s in seeds])


def png_bytes(outdir: Path, seeds) -> list[bytes]:
    return [png_path(outdir, s).read_bytes() for s in seeds]


# ------------------------------------------------------------------------------------------- per-seed bytes


@pytest.mark.parametrize("sampler", [HEUN, CHURN], ids=["heun", "edm_stochastic"])
def test_same_bytes_for_batch_sizes_and_ranks(tmp_path, sampler):
    """Float64 network: the random draws are per seed, so batch size 1, 3, 8 and 2 ranks write identical files."""
    denoiser = tiny_denoiser(label_dim=3, dtype=torch.float64)
    seeds = parse_seeds("0-9,1000-1001")
    for bs in (1, 3, 8):
        generate(denoiser, seeds, tmp_path / f"bs{bs}", sampler, batch_size=bs, progress=False)
    for rank in (1, 0):  # out of order on purpose
        generate(denoiser, seeds, tmp_path / "ranks", sampler, batch_size=3, rank=rank, world_size=2, progress=False)
    reference = png_bytes(tmp_path / "bs1", seeds)
    for out in ("bs3", "bs8", "ranks"):
        assert png_bytes(tmp_path / out, seeds) == reference, out
    assert png_path(tmp_path / "bs1", 1001) == tmp_path / "bs1" / "001000" / "001001.png"

    # The image of seed 7 alone, drawn by hand in EDM's order: latents, class, then the sampler's noise.
    g = torch.Generator().manual_seed(7)
    latents = torch.randn(1, 8, 8, generator=g)
    label = torch.randint(3, (), generator=g)
    x = sampler(denoiser, latents[None], class_labels=torch.eye(3)[label][None], generator=[g])
    expected = np.clip(x[0, 0].numpy() * 127.5 + 128, 0, 255).astype(np.uint8)  # EDM: truncation of x*127.5+128
    np.testing.assert_array_equal(read_pngs(tmp_path / "bs8", [7])[0], expected)
    assert len(np.unique(read_pngs(tmp_path / "bs8", seeds))) > 20  # real images, not a constant


def test_float32_network_same_bytes_across_ranks_and_within_one_level_across_batch_sizes(tmp_path):
    denoiser = tiny_denoiser()
    seeds = list(range(9))
    single = np.concatenate([pixels(generate_batch(denoiser, b, HEUN)[0]) for b in batches_for_rank(seeds, 3)])
    ranks = {s: None for s in seeds}
    for rank in range(3):
        for b in batches_for_rank(seeds, 3, rank, 3):
            for s, img in zip(b, pixels(generate_batch(denoiser, b, HEUN)[0]), strict=True):
                ranks[s] = img
    np.testing.assert_array_equal(np.stack([ranks[s] for s in seeds]), single)  # same batches, same bytes
    one_by_one = np.concatenate([pixels(generate_batch(denoiser, [s], HEUN)[0]) for s in seeds])
    # float32 kernels round differently for other batch shapes (~1e-7): at most one level, on few pixels
    diff = np.abs(one_by_one.astype(int) - single.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01


def test_to_uint8_is_edms_truncation_for_every_output():
    """PNG, npz, grid and FID pixels all come from to_uint8: clip(x * 127.5 + 128, 0, 255), truncated."""
    x = torch.tensor([-2.0, -1.0, -0.999, 0.0, 0.5, 0.9999, 1.0, 3.0], dtype=torch.float64).reshape(1, 2, 1, 4)
    expected = [[0, 0, 0, 128], [191, 255, 255, 255]]  # 0.5 -> 191.75 -> 191 (not 192)
    assert to_uint8(x).dtype == torch.uint8 and to_uint8(x)[0, :, 0].tolist() == expected
    assert to_uint8(x, channels_last=True).shape == (1, 1, 4, 2)
    assert torch.equal(to_uint8(x, channels_last=True), to_uint8(x).permute(0, 2, 3, 1))


def test_npz_matches_pngs_and_ranks_merge(tmp_path):
    denoiser = tiny_denoiser(label_dim=3)
    seeds = [4, 0, 1, 2, 3, 9]
    generate(denoiser, seeds, tmp_path / "png", HEUN, batch_size=2, class_labels="all", progress=False)
    generate(denoiser, seeds, tmp_path / "npz", HEUN, batch_size=2, class_labels="all", format="npz", progress=False)
    for rank in (1, 0):
        generate(denoiser, seeds, tmp_path / "npz2", HEUN, batch_size=2, class_labels="all", format="npz", rank=rank,
                 world_size=2, progress=False)
    with np.load(tmp_path / "npz" / npz_name(seeds)) as f:
        single = dict(f)
    assert single["images"].dtype == np.uint8 and single["images"].shape == (6, 8, 8, 1)
    assert single["seeds"].tolist() == seeds and single["labels"].tolist() == [s % 3 for s in seeds]
    np.testing.assert_array_equal(single["images"][..., 0], read_pngs(tmp_path / "png", seeds))
    with np.load(tmp_path / "npz2" / npz_name(seeds)) as f:
        merged = dict(f)
    for key in single:
        np.testing.assert_array_equal(merged[key], single[key])
    assert not list((tmp_path / "npz2").glob(".samples-part*"))  # parts removed after the merge


def test_grid_is_one_picture(tmp_path):
    result = generate(tiny_denoiser(), range(10), tmp_path, HEUN, batch_size=4, grid=True, progress=False)
    grid = PIL.Image.open(tmp_path / "grid.png")
    assert result.paths == [tmp_path / "grid.png"] and grid.size == (4 * 9 + 1, 3 * 9 + 1)  # 4 columns, 1 px pad
    assert not list(tmp_path.glob("000000"))


def test_resume_refuses_other_settings(tmp_path):
    denoiser = tiny_denoiser()
    generate(denoiser, [0, 1], tmp_path, HEUN, settings={"num_steps": 3}, progress=False)
    again = generate(denoiser, [0, 1, 2], tmp_path, HEUN, settings={"num_steps": 3}, progress=False)
    assert again.skipped == [0, 1] and again.written == [2]
    with pytest.raises(ValueError, match="other settings.*num_steps"):
        generate(denoiser, [0, 1], tmp_path, HEUN, settings={"num_steps": 4}, progress=False)


# ------------------------------------------------------------------------------------------- kill and resume


def test_killed_run_restarts_with_exactly_the_missing_seeds(tmp_path):
    ckpt = checkpoints.save_denoiser(tiny_denoiser(), tmp_path / "tiny.pt")
    outdir = tmp_path / "out"
    n = 400
    cmd = [sys.executable, str(ROOT / "sample.py"), f"ckpt={ckpt}", f"seeds=0-{n - 1}", "batch_size=2",
           "num_steps=2", f"outdir={outdir}", "progress=false", "device=cpu"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while len(list(outdir.glob("*/*.png"))) < 6:
        assert proc.poll() is None, proc.stdout.read().decode()
        assert time.monotonic() < deadline, "no images after 120 s"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in outdir.glob("*/*.png")}
    assert 6 <= len(before) < n, "the run finished before it was killed; the test needs more seeds"

    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    files = sorted(outdir.glob("*/*.png"))
    assert [p.name for p in files] == [f"{s:06d}.png" for s in range(n)]
    for p in files:  # every file decodes completely
        with PIL.Image.open(p) as image:
            image.load()
            assert image.size == (8, 8)
    for p, stamp in before.items():  # the restart did not touch what was there
        assert (p.stat().st_ino, p.stat().st_mtime_ns) == stamp
    assert not [p for p in outdir.rglob("*") if ".tmp" in p.name]
    assert f"{len(before)} seed(s) already written" in done.stdout + done.stderr

    # The files on both sides of the interruption hold what an uninterrupted run computes.
    first_missing = min(set(range(n)) - {int(p.stem) for p in before})
    denoiser = load_any(ckpt).denoiser
    sampler = functools.partial(sample, num_steps=2)
    for batch in batches_for_rank(range(n), 2)[max(first_missing // 2 - 2, 0):first_missing // 2 + 3]:
        expected = pixels(generate_batch(denoiser, batch, sampler)[0])[..., 0]
        np.testing.assert_array_equal(read_pngs(outdir, batch), expected)


# ------------------------------------------------------------------------------------------- checkpoint kinds


def four_images(denoiser) -> np.ndarray:
    return pixels(generate_batch(denoiser, [0, 1, 2, 3], HEUN)[0])


def test_exported_checkpoint(tmp_path):
    denoiser = tiny_denoiser(label_dim=3)
    path = checkpoints.save_denoiser(denoiser, tmp_path / "last_ema.pt")
    loaded = load_any(path).denoiser
    images = four_images(loaded)
    assert images.shape == (4, 8, 8, 1) and images.std() > 0
    np.testing.assert_array_equal(images, four_images(denoiser))
    with pytest.raises(ValueError, match="use_ema=false"):
        load_any(path, use_ema=False)


def test_training_checkpoint_ema_and_raw_weights(tmp_path):
    import lightning as L

    from edmlab import loss
    from edmlab.training import EDMModule

    denoiser = tiny_denoiser(label_dim=3)
    module = EDMModule(denoiser, loss.get("edm"), functools.partial(torch.optim.Adam, lr=1e-3), batch_size=4,
                       data_shape=[1, 8, 8], lr_rampup_kimg=0)
    images = torch.randn(8, 1, 8, 8)
    labels = torch.eye(3)[torch.arange(8) % 3]
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels), batch_size=4)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, data)
    with torch.no_grad():  # make the EMA visibly different from the raw weights
        for p in module.ema.module.parameters():
            p.mul_(0.9)
    trainer.save_checkpoint(tmp_path / "last.ckpt")

    ema, raw = load_any(tmp_path / "last.ckpt").denoiser, load_any(tmp_path, use_ema=False).denoiser  # file / run dir
    for loaded, source in ((ema, module.ema.module), (raw, module.denoiser)):
        mine = loaded.state_dict()
        assert all(torch.equal(mine[k], v) for k, v in source.state_dict().items())
        assert loaded.precond.name == "edm" and loaded.label_dim == 3 and list(loaded.data_shape) == [1, 8, 8]
        np.testing.assert_array_equal(four_images(loaded), four_images(source.eval()))
    assert not np.array_equal(four_images(ema), four_images(raw))


def test_edm_pickle(tmp_path):
    from test_checkpoints_edm import edm_network, write_edm_snapshot

    path = write_edm_snapshot(tmp_path / "network-snapshot-000000.pkl", edm_network("ddpmpp", 0, 0), "EDMPrecond",
                              "ddpmpp")
    loaded = load_any(path).denoiser
    images = four_images(loaded)
    assert images.shape == (4, 8, 8, 3) and images.std() > 0
    np.testing.assert_array_equal(images, four_images(checkpoints.load_edm_pickle(path)))
    with pytest.raises(ValueError, match="only the EMA"):
        load_any(path, use_ema=False)


def test_cli_run_in_process(tmp_path):
    """configs/sample.yaml composed as `python sample.py` would: shortcuts, sampler group, npz output."""
    from hydra import compose, initialize_config_dir

    from edmlab.cli.sample import CONFIG_DIR, ckpt_name, run

    ckpt = checkpoints.save_denoiser(tiny_denoiser(label_dim=3), tmp_path / "run" / "checkpoints" / "last_ema.pt")
    assert ckpt_name(str(ckpt)) == "run-last_ema"
    assert ckpt_name("x/network-snapshot-001000.pkl") == "x-network-snapshot-001000"
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("sample", overrides=[f"ckpt={ckpt}", "seeds=[0-2,7]", "num_steps=3", "solver=euler",
                                           "class_labels=2", "format=npz", f"outdir={tmp_path / 'out'}",
                                           "progress=false", "batch_size=3", "device=cpu"])
    result = run(cfg)
    assert result.written == [0, 1, 2, 7]
    with np.load(tmp_path / "out" / npz_name([0, 1, 2, 7])) as f:
        assert f["seeds"].tolist() == [0, 1, 2, 7] and f["labels"].tolist() == [2] * 4
        euler = functools.partial(sample, solver="euler", num_steps=3)
        expected = pixels(generate_batch(load_any(ckpt).denoiser, [0, 1, 2], euler, class_labels=2)[0])
        np.testing.assert_array_equal(f["images"][:3], expected)


# ------------------------------------------------------------------------------------------- wrong kinds


def test_wrong_kinds_fail_clearly(tmp_path):
    cases = {
        "weights.pt": lambda p: torch.save({"weights": torch.zeros(3)}, p),
        "model.pt": lambda p: torch.save(torch.nn.Linear(2, 2), p),  # a pickled module: refused, never run
        "lightning.ckpt": lambda p: torch.save({"pytorch-lightning_version": "2.6.0", "state_dict": {}}, p),
        "notes.txt": lambda p: p.write_text("not a checkpoint"),
        "dict.pkl": lambda p: p.write_bytes(pickle.dumps({"ema": 1})),
    }
    for name, write in cases.items():
        path = tmp_path / name
        write(path)
        with pytest.raises(ValueError) as err:
            load_any(path)
        message = str(err.value)
        assert "Accepted kinds" in message and "network-snapshot" in message and "last.ckpt" in message, name
        assert str(path) in message
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_any(tmp_path / "missing.pt")


@pytest.fixture(autouse=True)
def one_thread():
    """8x8 images: a second thread only adds synchronisation (and stalls badly on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
