"""Latent diffusion: EDM2's latent scale/shift, the dataset tool, resumable latent batches, training and decoding
sampling, with a tiny randomly initialised AutoencoderKL saved to a folder (no download)."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

diffusers = pytest.importorskip("diffusers")

from edmlab.checkpoints import load_any  # noqa: E402
from edmlab.data.latents import LatentDataModule, LatentDataset  # noqa: E402
from edmlab.encoders import (  # noqa: E402
    IdentityEncoder,
    StabilityVAEEncoder,
    edm2_encoder_config,
    encoder_config,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    vae = diffusers.models.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
                                         down_block_types=["DownEncoderBlock2D"] * 2,
                                         up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 16],
                                         norm_num_groups=4, sample_size=16)
    folder = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    labels = []
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"img{i:02d}.png")
        labels.append([f"img{i:02d}.png", i % 3])
    (folder / "dataset.json").write_text(json.dumps({"labels": labels}))
    return folder


def test_edm2_latent_scale_and_shift_closed_form(vae_dir):
    encoder = StabilityVAEEncoder(vae_name=str(vae_dir))
    raw_std = torch.tensor([4.17, 4.62, 3.71, 3.28])
    raw_mean = torch.tensor([5.81, 3.25, 0.12, -2.15])
    assert torch.allclose(encoder.scale, 0.5 / raw_std) and torch.allclose(encoder.bias, -raw_mean * 0.5 / raw_std)
    mean = raw_mean.reshape(1, 4, 1, 1) + raw_std.reshape(1, 4, 1, 1) * torch.randn(2, 4, 3, 3)
    raw = torch.cat([mean, torch.zeros_like(mean)], dim=1)  # std 0: no draw
    final = encoder.encode_latents(raw)
    assert torch.allclose(final, (mean - raw_mean.reshape(1, 4, 1, 1)) / raw_std.reshape(1, 4, 1, 1) * 0.5, atol=1e-6)
    # decoding inverts the affine map, then runs the VAE decoder on [0, 1] pixels
    vae = encoder.vae(torch.device("cpu"))
    expected = vae.decode(mean)["sample"].clamp(0, 1) * 2 - 1
    assert torch.allclose(encoder.decode(final), expected, atol=1e-5)
    # the draw is mean + std * n with the generator's n
    raw = torch.cat([mean, torch.full_like(mean, 2.0)], dim=1)
    n = torch.randn(mean.shape, generator=torch.Generator().manual_seed(5))
    drawn = encoder.encode_latents(raw, generator=torch.Generator().manual_seed(5))
    assert torch.allclose(drawn, (mean + 2 * n) * encoder.scale.reshape(1, 4, 1, 1) + encoder.bias.reshape(1, 4, 1, 1))


def test_edm2_snapshot_encoder_record_keeps_scale_and_bias():
    scale = 0.5 / np.array([4.17, 4.62, 3.71, 3.28])
    bias = -np.array([5.81, 3.25, 0.12, -2.15]) * scale
    config = edm2_encoder_config({"kind": "sd_vae", "vae_name": "v", "scale": scale.tolist(), "bias": bias.tolist()})
    encoder = StabilityVAEEncoder(**{k: v for k, v in config.items() if k != "_target_"})
    assert np.allclose(encoder.scale.numpy(), scale, rtol=1e-6) and np.allclose(encoder.bias.numpy(), bias, atol=1e-6)
    assert edm2_encoder_config({"kind": "identity"}) is None


def encode_folder(image_folder: Path, vae_dir: Path, dst: Path) -> Path:
    sys.path.insert(0, str(ROOT / "scripts"))
    import encode_latents

    assert encode_latents.main([str(image_folder), str(dst), "--vae", str(vae_dir), "--batch-size", "5",
                                "--device", "cpu"]) == 0
    return dst


def test_dataset_tool_and_resumable_latent_batches(tmp_path, image_folder, vae_dir):
    dst = encode_folder(image_folder, vae_dir, tmp_path / "latents")
    dataset = LatentDataset(dst)
    assert len(dataset) == 12 and dataset.image_shape == (8, 8, 8) and dataset.label_dim == 3
    encoder = StabilityVAEEncoder(vae_name=str(vae_dir))
    pixels = torch.from_numpy(np.array(Image.open(image_folder / "img03.png"))).permute(2, 0, 1)[None].float()
    expected = encoder.encode_pixels(pixels / 127.5 - 1)[0]
    assert torch.allclose(dataset[3][0], expected, atol=1e-5)  # the stored raw latents are the VAE's mean/std
    assert json.loads((dst / "dataset.json").read_text())["encoder"]["vae_name"] == str(vae_dir)

    dm = LatentDataModule(dst, encoder=encoder, batch_size=4, seed=1)
    assert dm.image_shape == (4, 8, 8) and dm.label_dim == 3
    it = iter(dm.batches())
    first, second = next(it), next(it)
    assert first[0].shape == (4, 4, 8, 8) and first[1].shape == (4, 3)
    resumed = next(iter(dm.batches(start_images=4)))  # a run resumed after one step sees the same draws
    assert torch.equal(resumed[0], second[0]) and torch.equal(resumed[1], second[1])
    assert not torch.equal(next(iter(dm.batches()))[0], second[0])


@pytest.mark.slow
def test_latent_training_and_decoding_sampler(tmp_path, image_folder, vae_dir):
    sys.path.insert(0, str(ROOT / "tests"))
    from hydra import compose, initialize_config_dir
    from test_train import FAST, compose_cfg

    from edmlab.cli.sample import CONFIG_DIR, run
    from edmlab.cli.train import train

    dst = encode_folder(image_folder, vae_dir, tmp_path / "latents")
    cfg = compose_cfg(tmp_path, ["experiment=img512_edm2", *FAST, "trainer=cpu", "trainer.max_steps=2",
                                 f"data.dataset.path={dst}", "data.batch_size=4", f"encoder.vae_name={vae_dir}",
                                 "network.model_channels=8", "network.channel_mult=[1,2]", "network.num_blocks=1",
                                 "network.attn_resolutions=[4]", "+network.channels_per_head=8",
                                 "callbacks.checkpoint.snapshot_every_kimg=null"])
    train(cfg)
    ckpt = tmp_path / "run" / "checkpoints" / "last_ema.pt"
    assert list(ckpt.parent.glob("phema-*.pt"))  # post-hoc EMA profiles go with every checkpoint
    assert encoder_config(load_any(ckpt))["vae_name"] == str(vae_dir)
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        scfg = compose("sample", overrides=[f"ckpt={ckpt}", "seeds=0-1", f"outdir={tmp_path / 'out'}",
                                            "num_steps=2", "device=cpu", "progress=false"])
    result = run(scfg)
    png = np.array(Image.open(result.paths[0]))
    assert png.shape == (16, 16, 3)  # decoded: the VAE doubles the 8x8 latents, RGB out
    assert isinstance(IdentityEncoder().decode(torch.ones(1)), torch.Tensor)
