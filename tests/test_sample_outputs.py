"""sample.py keeps what it wrote (npz files per seed range, no mixing of two states of a checkpoint or of two
precisions), writes files while the next batch samples, and its bf16 fast path rounds only the network."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from test_generate import HEUN, tiny_denoiser

from edmlab import checkpoints
from edmlab.cli.sample import CONFIG_DIR, _described, run
from edmlab.generation import generate, generate_batch, npz_name, png_path, with_precision, writers
from edmlab.networks.layers import Conv2d, set_attention


def test_two_seed_ranges_into_one_outdir_keep_both_files(tmp_path):
    denoiser = tiny_denoiser(label_dim=0)
    for seeds in (range(0, 4), range(4, 8)):
        generate(denoiser, list(seeds), tmp_path, HEUN, batch_size=2, format="npz", progress=False)
    assert sorted(p.name for p in tmp_path.glob("*.npz")) == ["samples-000000-000003.npz",
                                                               "samples-000004-000007.npz"]
    for lo in (0, 4):
        with np.load(tmp_path / npz_name(range(lo, lo + 4))) as f:
            assert f["seeds"].tolist() == list(range(lo, lo + 4))
    assert npz_name([3, 1]) != npz_name([1, 3]) and npz_name([1, 3]).startswith("samples-000001-000003-")


def _cfg(ckpt, outdir, seeds: str, extra: list[str] = ()):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("sample", overrides=[f"ckpt={ckpt}", f"seeds={seeds}", "num_steps=2", f"outdir={outdir}",
                                            "progress=false", "device=cpu", "format=npz", *extra])


def _pixel_diff(a, b, seeds) -> np.ndarray:
    """|a - b| of the uint8 images two sample.py runs wrote as npz (same seeds)."""
    with np.load(a / npz_name(seeds)) as x, np.load(b / npz_name(seeds)) as y:
        return np.abs(x["images"].astype(int) - y["images"].astype(int))


def test_rerun_after_the_checkpoint_changed_is_refused(tmp_path):
    ckpt = tmp_path / "run" / "checkpoints" / "last_ema.pt"
    checkpoints.save_denoiser(tiny_denoiser(label_dim=0), ckpt, global_step=10)
    out = tmp_path / "out"
    run(_cfg(ckpt, out, "0-3"))
    run(_cfg(ckpt, out, "4-7"))  # same checkpoint, another range: fine
    checkpoints.save_denoiser(tiny_denoiser(label_dim=0, seed=1), ckpt, global_step=20)  # trained on
    with pytest.raises(ValueError, match=r"holds samples written with other settings \(checkpoint: .*global_step"):
        run(_cfg(ckpt, out, "8-11"))


def _conv_and_denoiser_dtypes(denoiser, sampler) -> tuple[set, set, torch.Tensor]:
    """(dtypes out of the network's convolutions, dtypes out of D, the samples) of one 2-seed batch."""
    convs, ds = set(), set()
    hooks = [m.register_forward_hook(lambda m, i, o: convs.add(o.dtype)) for m in denoiser.net.modules()
             if isinstance(m, Conv2d)]
    hooks.append(denoiser.register_forward_hook(lambda m, i, o: ds.add(o.dtype)))
    with torch.no_grad():
        images, _ = generate_batch(denoiser, [0, 1], sampler)
    for h in hooks:
        h.remove()
    return convs, ds, images


def test_the_start_line_names_the_sampler_settings_readably():
    solver = {"solver": "heun", "num_steps": 18, "sigma_min": None,
              "process": {"_target_": "edmlab.process.get", "name": "edm", "sigma_min": 0.002, "sigma_max": 80.0}}
    assert _described(solver) == "solver=heun, num_steps=18, process=edm(sigma_min=0.002, sigma_max=80.0)"


def test_bf16_sampling_rounds_the_network_alone():
    """precision=bf16: convolutions run in bf16; D(x; sigma) keeps the solver's float64, the samples are float32."""
    denoiser = tiny_denoiser(label_dim=0)
    convs32, ds32, ref = _conv_and_denoiser_dtypes(denoiser, with_precision(HEUN, "cpu", "fp32"))
    convs16, ds16, images = _conv_and_denoiser_dtypes(denoiser, with_precision(HEUN, "cpu", "bf16"))
    assert convs32 == {torch.float32} and convs16 == {torch.bfloat16}
    assert ds32 == ds16 == {torch.float64} and images.dtype == ref.dtype == torch.float32
    err = float((images - ref).abs().max() / ref.abs().max())
    assert 0 < err < 3e-2  # bf16 keeps 8 bits of mantissa: a few 2^-8 of rounding over 3 Heun steps
    assert with_precision(HEUN, "cpu", "fp32") is HEUN
    with pytest.raises(ValueError, match="precision='fp16': use one of fp32 | bf16"):
        with_precision(HEUN, "cpu", "fp16")


def test_sample_py_fast_path_writes_near_fp32_pixels_and_guards_its_folder(tmp_path):
    ckpt = tmp_path / "last_ema.pt"
    checkpoints.save_denoiser(tiny_denoiser(label_dim=0), ckpt, global_step=10)
    fast = ["precision=bf16", "channels_last=true", "attention=sdpa"]
    run(_cfg(ckpt, tmp_path / "fp32", "0-3"))
    try:
        run(_cfg(ckpt, tmp_path / "fast", "0-3", fast))
    finally:
        set_attention("einsum")  # a process-wide switch: later tests get EDM's attention
    diff = _pixel_diff(tmp_path / "fp32", tmp_path / "fast", range(4))
    # bf16 took effect, and moved few pixels (this random net saturates, so a moved pixel can move far)
    assert diff.any() and (diff > 8).mean() < 0.05 and diff.mean() < 2
    settings = json.loads((tmp_path / "fast" / "sample_settings.json").read_text())
    assert settings["precision"] == "bf16"
    assert "precision" not in json.loads((tmp_path / "fp32" / "sample_settings.json").read_text())
    with pytest.raises(ValueError, match=r"other settings \(precision: 'bf16' there, the default now\)"):
        run(_cfg(ckpt, tmp_path / "fast", "4-7"))  # fp32 into the bf16 folder


def test_files_are_written_while_the_next_batch_samples(tmp_path, monkeypatch):
    """Batch k's PNGs are encoded while batch k + 1 samples: batch 0's writer waits for batch 1's sampling."""
    second_batch_sampling = threading.Event()
    batches = []

    def sampler(denoiser, latents, **kwargs):
        batches.append(latents)
        if len(batches) == 2:
            second_batch_sampling.set()
        return HEUN(denoiser, latents, **kwargs)

    def save_png(pixels, path):
        if path.name == "000000.png":  # written in sequence, this would wait for a batch never started
            assert second_batch_sampling.wait(timeout=120), "batch 0's files were written before batch 1 sampled"
        real_save_png(pixels, path)

    real_save_png = writers.save_png
    monkeypatch.setattr(writers, "save_png", save_png)
    result = generate(tiny_denoiser(), range(6), tmp_path, sampler, batch_size=2, progress=False)
    assert result.written == list(range(6)) and all(png_path(tmp_path, s).is_file() for s in range(6))


def test_a_failing_write_stops_sampling_with_its_error(tmp_path, monkeypatch):
    def full_disk(pixels, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(writers, "save_png", full_disk)
    with pytest.raises(OSError, match="No space left on device"):
        generate(tiny_denoiser(), range(6), tmp_path, HEUN, batch_size=2, progress=False)


@pytest.mark.slow
def test_sample_py_with_a_compiled_network_writes_the_eager_pixels(tmp_path, monkeypatch):
    """compile=true (torch.compile, 20-90 s on a CPU): the eager images up to float rounding."""
    compiled, real_compile = [], torch.nn.Module.compile

    def compile(module, **kwargs):
        compiled.append(module)
        real_compile(module, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "compile", compile)
    ckpt = tmp_path / "last_ema.pt"
    checkpoints.save_denoiser(tiny_denoiser(label_dim=0), ckpt, global_step=10)
    run(_cfg(ckpt, tmp_path / "eager", "0-3"))
    assert compiled == []
    run(_cfg(ckpt, tmp_path / "compiled", "0-3", ["compile=true"]))
    assert [type(m).__name__ for m in compiled] == ["SongUNet"]  # the network, not the preconditioning
    diff = _pixel_diff(tmp_path / "eager", tmp_path / "compiled", range(4))
    assert (diff > 1).mean() < 0.05 and diff.mean() < 0.5  # fused kernels round differently: rarely a level apart
