"""Start-up: sampling runs without importing Lightning, `train.py --help` without Lightning or torch, and
loading a checkpoint without importing torch._dynamo (a fresh interpreter each)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from edmlab import checkpoints
from edmlab.networks import NAMES, build
from edmlab.precond import Denoiser

ROOT = Path(__file__).resolve().parents[1]

# Runs a repository script as `python <script> <args>` would, then prints the top-level packages it loaded.
PROBE = """
import json, runpy, sys
script, args = sys.argv[1], sys.argv[2:]
sys.argv = [script, *args]
try:
    runpy.run_path(script, run_name="__main__")
except SystemExit as e:
    assert e.code in (None, 0), e.code
print(json.dumps(sorted({m.split(".")[0] for m in sys.modules})))
"""


def _packages_loaded(script: str, *args: str) -> set[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    done = subprocess.run([sys.executable, "-c", PROBE, str(ROOT / script), *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return set(json.loads(done.stdout.strip().splitlines()[-1]))


def test_train_help_imports_neither_lightning_nor_torch():
    loaded = _packages_loaded("train.py", "--help")
    assert {"hydra", "edmlab"} <= loaded  # the probe saw the script run
    assert not loaded & {"lightning", "pytorch_lightning", "torch"}


def test_sample_py_generates_without_importing_lightning(tmp_path):
    torch.manual_seed(0)
    net = build("ddpmpp", img_resolution=8, img_channels=1, model_channels=16, channel_mult=[1, 2], num_blocks=1,
                attn_resolutions=[], dropout=0.0)
    ckpt = checkpoints.save_denoiser(Denoiser(net), tmp_path / "tiny.pt")
    outdir = tmp_path / "out"
    loaded = _packages_loaded("sample.py", f"ckpt={ckpt}", "seeds=0-1", "num_steps=2", "device=cpu",
                              f"outdir={outdir}", "progress=false")
    assert "torch" in loaded and not loaded & {"lightning", "pytorch_lightning"}
    images = [np.asarray(PIL.Image.open(outdir / "000000" / f"{s:06d}.png")) for s in (0, 1)]
    assert [im.shape for im in images] == [(8, 8), (8, 8)]


def test_metrics_and_generation_import_light():
    """metrics/ parses seeds with generation/'s parser: neither pulls Lightning, Hydra, rich or PIL on import."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    probe = ("import json, sys, edmlab.metrics, edmlab.generation, edmlab.console; "
             "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))")
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = set(json.loads(done.stdout.strip().splitlines()[-1]))
    assert "edmlab" in loaded and "torch" in loaded
    assert not loaded & {"lightning", "pytorch_lightning", "hydra", "omegaconf", "rich", "PIL"}


def test_checkpoint_shape_probe_does_not_import_dynamo():
    """The loader builds each network on the meta device first; any out-of-place arithmetic there runs a Python
    meta kernel whose first call imports torch._dynamo (about 1 s of sample.py's start-up)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    probe = ("import json, sys, torch\n"
             "from edmlab.networks import build\n"
             "for config in json.loads(sys.argv[1]):\n"
             "    with torch.device('meta'):\n"
             "        net = build(**config)\n"
             "    assert all(t.is_meta for t in net.state_dict().values())\n"
             "print(json.dumps('torch._dynamo' in sys.modules))")
    small = dict(img_resolution=8, img_channels=3, label_dim=10, model_channels=16, channel_mult=[1, 2],
                 num_blocks=1, attn_resolutions=[4])
    configs = [dict(name=name, **small) for name in NAMES if name != "mlp"]
    configs += [dict(name="ncsnpp", encoder_type="skip", decoder_type="skip", **small),
                dict(name="mlp", img_resolution=1, img_channels=2, embedding_type="fourier")]
    done = subprocess.run([sys.executable, "-c", probe, json.dumps(configs)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) is False
