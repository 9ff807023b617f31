"""Official EDM2 snapshots (network-snapshot-*.pkl of NVlabs/edm2) through the safe loader, without NVlabs code."""

import sys
import types
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edmlab.checkpoints import load_denoiser, read_edm_snapshot, save_denoiser
from edmlab.networks import build
from edmlab.precond import Denoiser

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_checkpoints_edm import _SnapshotPickler, pickle_globals  # noqa: E402  (the NVlabs-structure pickle writer)

EDM2_KWARGS = dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], channels_per_head=8,
                   dropout=0.0)
NVLABS_NAMES = {"EDM2UNet": "UNet", "EDM2Block": "Block", "MPConv": "MPConv", "MPFourier": "MPFourier"}


def edm2_denoiser(label_dim: int = 10, seed: int = 0) -> Denoiser:
    torch.manual_seed(seed)
    net = build("edm2", img_resolution=8, img_channels=4, label_dim=label_dim, **EDM2_KWARGS)
    denoiser = Denoiser(net, name="edm", logvar_channels=32)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in denoiser.parameters():
            p.copy_(torch.randn(p.shape, generator=g))  # gains included: every path is live
    return denoiser.eval().requires_grad_(False)


def write_edm2_snapshot(path: Path, denoiser: Denoiser) -> Path:
    """What NVlabs/edm2's training loop pickles: EasyDict(encoder, dataset_kwargs, loss_fn, ema=Precond fp16)."""
    label_dim = denoiser.net.label_dim
    top = nn.Module()  # stands for edm2's Precond: img_* attributes, sigma_data, unet, logvar head
    top.img_resolution, top.img_channels, top.label_dim, top.use_fp16, top.sigma_data = 8, 4, label_dim, True, 0.5
    top.unet, top.logvar_fourier, top.logvar_linear = denoiser.net, denoiser.logvar_fourier, denoiser.logvar_linear
    top = top.half().eval()  # snapshots are written in float16
    precond_kwargs = dict(img_resolution=8, img_channels=4, label_dim=label_dim, use_fp16=True, **EDM2_KWARGS)
    records = {id(top): ("Precond", precond_kwargs)}
    for module in top.modules():
        if module is not top and not isinstance(module, nn.ModuleDict):
            records[id(module)] = (NVLABS_NAMES[type(module).__name__], {})
    encoder = types.SimpleNamespace(vae_name="stabilityai/sd-vae-ft-mse", batch_size=8, _vae=None,
                                    scale=np.float32(0.5) / np.float32([4.17, 4.62, 3.71, 3.28]),
                                    bias=np.float32(0) - np.float32([5.81, 3.25, 0.12, -2.15]) * np.float32(0.125))
    loss_fn = types.SimpleNamespace(P_mean=-0.4, P_std=1.0, sigma_data=0.5)
    records[id(encoder)] = ("StabilityVAEEncoder", {})
    records[id(loss_fn)] = ("EDM2Loss", dict(P_mean=-0.4, P_std=1.0))
    data = dict(encoder=encoder, dataset_kwargs=dict(class_name="training.dataset.ImageFolderDataset",
                                                     path="img512-sd.zip", use_labels=True), loss_fn=loss_fn, ema=top)
    with open(path, "wb") as f:
        _SnapshotPickler(f, records, "class UNet: ...\n").dump(data)
    return path


def test_edm2_snapshot_reproduces_its_denoiser_and_exports(tmp_path):
    original = edm2_denoiser()
    path = write_edm2_snapshot(tmp_path / "network-snapshot-0000128-0.100.pkl", edm2_denoiser())
    assert "numpy._core.multiarray._reconstruct" in pickle_globals(path) or \
        "numpy.core.multiarray._reconstruct" in pickle_globals(path)  # the encoder's arrays are in there
    snap = read_edm_snapshot(path)
    loaded = snap.denoiser
    assert snap.precond_class == "Precond" and loaded.precond_params == {"sigma_data": 0.5, "logvar_channels": 32}
    assert loaded.net.build_config["model_channels"] == 16 and loaded.label_dim == 10
    # float16 in the file: the weights are the originals rounded to float16
    for key, value in original.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value.half().float()), key
    reference = original.half().float()
    x, sigma, labels = torch.randn(3, 4, 8, 8), torch.tensor([0.1, 1.0, 20.0]), torch.eye(10)[[1, 4, 7]]
    D, u = loaded(x, sigma, labels, return_logvar=True)
    D_ref, u_ref = reference(x, sigma, labels, return_logvar=True)
    assert torch.equal(D, D_ref) and torch.equal(u, u_ref)
    assert snap.loss == {"class_name": "EDM2Loss", "kwargs": {"P_mean": -0.4, "P_std": 1.0}}
    enc = snap.encoder
    assert enc["kind"] == "sd_vae" and enc["vae_name"] == "stabilityai/sd-vae-ft-mse"
    assert np.allclose(enc["scale"], 0.5 / np.array([4.17, 4.62, 3.71, 3.28]), rtol=1e-6)
    # export to edmlab's format and back
    out = save_denoiser(loaded, tmp_path / "edm2.pt", config={"edm_snapshot": snap.metadata()})
    again = load_denoiser(out)
    assert torch.equal(again(x, sigma, labels), D)
    assert torch.load(out, weights_only=True)["config"]["edm_snapshot"]["encoder"]["kind"] == "sd_vae"


def test_edm2_unconditional_snapshot(tmp_path):
    path = write_edm2_snapshot(tmp_path / "uncond.pkl", edm2_denoiser(label_dim=0, seed=1))
    loaded = read_edm_snapshot(path).denoiser
    assert loaded.label_dim == 0 and loaded.net.emb_label is None
    assert torch.isfinite(loaded(torch.randn(2, 4, 8, 8), 2.0)).all()
