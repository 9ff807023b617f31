"""sample.py keeps what it wrote: npz files per seed range, and no mixing of two states of a checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from test_generate import HEUN, tiny_denoiser

from edmlab import checkpoints
from edmlab.cli.sample import CONFIG_DIR, run
from edmlab.generation import generate, npz_name


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


def _cfg(ckpt, outdir, seeds: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("sample", overrides=[f"ckpt={ckpt}", f"seeds={seeds}", "num_steps=2", f"outdir={outdir}",
                                            "progress=false", "device=cpu", "format=npz"])


def test_rerun_after_the_checkpoint_changed_is_refused(tmp_path):
    ckpt = tmp_path / "run" / "checkpoints" / "last_ema.pt"
    checkpoints.save_denoiser(tiny_denoiser(label_dim=0), ckpt, global_step=10)
    out = tmp_path / "out"
    run(_cfg(ckpt, out, "0-3"))
    run(_cfg(ckpt, out, "4-7"))  # same checkpoint, another range: fine
    checkpoints.save_denoiser(tiny_denoiser(label_dim=0, seed=1), ckpt, global_step=20)  # trained on
    with pytest.raises(ValueError, match=r"holds samples written with other settings \(checkpoint: .*global_step"):
        run(_cfg(ckpt, out, "8-11"))
