"""Pixels <-> the space the denoiser works in: identity (pixels) or Stable Diffusion's VAE (EDM2's latents).

As NVlabs/edm2 `training/encoders.py`: raw pixels are encoded once into *raw latents* (the VAE's posterior
mean and std, 2C channels, stored by `scripts/encode_latents.py`); at training time each read draws
mean + std * n and maps it to *final latents* x = raw * scale + bias with scale = final_std / raw_std and
bias = final_mean - raw_mean * scale (EDM2 App. B.1: unit-ish statistics, std 0.5 = sigma_data). Decoding
inverts the affine map and runs the VAE decoder. Images here are float in [-1, 1] (edmlab's convention);
the VAE sees pixels in [0, 1] as in NVlabs/edm2, which is what EDM2's raw_mean/raw_std were measured on.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:  # encoders are imported by data/; the checkpoints package only where a file is read
    from edmlab.checkpoints import Loaded

__all__ = ["Encoder", "IdentityEncoder", "StabilityVAEEncoder", "load_vae", "encoder_config"]


class Encoder:
    """Pixels [-1, 1] -> raw latents -> final latents (what the network models), and final latents -> pixels."""

    raw_channels_per_channel = 1  # raw latents hold this many channels per final channel

    def encode_pixels(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode_latents(self, raw: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.encode_latents(self.encode_pixels(images), generator=generator)


class IdentityEncoder(Encoder):
    """Pixel-space diffusion: every map is the identity."""

    def encode_pixels(self, images):
        return images

    def encode_latents(self, raw, generator=None):
        return raw

    def decode(self, latents):
        return latents


def load_vae(vae_name: str, device: torch.device | str = "cpu") -> nn.Module:
    """diffusers' AutoencoderKL from a local folder or the model hub (cached copy first, as NVlabs)."""
    try:
        from diffusers.models import AutoencoderKL
    except ImportError as err:
        raise ImportError("encoder=sd_vae needs diffusers: pip install \"torch==<your torch version>\" diffusers "
                          "(pin torch so pip keeps the installed build)") from err
    if Path(vae_name).is_dir():
        vae = AutoencoderKL.from_pretrained(vae_name)
    else:
        try:
            vae = AutoencoderKL.from_pretrained(vae_name, local_files_only=True)
        except OSError:
            vae = AutoencoderKL.from_pretrained(vae_name)
    return vae.eval().requires_grad_(False).to(device)


class StabilityVAEEncoder(Encoder):
    """Stable Diffusion's VAE (stabilityai/sd-vae-ft-mse) with EDM2's latent scale and shift."""

    raw_channels_per_channel = 2

    def __init__(self,
                 vae_name: str = "stabilityai/sd-vae-ft-mse",            # hub name or a local folder
                 raw_mean: Sequence[float] = (5.81, 3.25, 0.12, -2.15),  # EDM2's raw-latent mean per channel
                 raw_std: Sequence[float] = (4.17, 4.62, 3.71, 3.28),    # EDM2's raw-latent std per channel
                 final_mean: float = 0.0,                                # mean of the final latents
                 final_std: float = 0.5,                                 # std of the final latents
                 batch_size: int = 8,                                    # images per VAE call
                 vae: nn.Module | None = None,                           # an AutoencoderKL to use as is
                 ) -> None:
        self.vae_name = str(vae_name)
        self.scale = torch.tensor([final_std / s for s in raw_std], dtype=torch.float32)
        self.bias = torch.tensor([final_mean - m * final_std / s for m, s in zip(raw_mean, raw_std, strict=True)],
                                 dtype=torch.float32)
        self.batch_size = int(batch_size)
        self._vae = vae

    def vae(self, device: torch.device) -> nn.Module:
        if self._vae is None:
            self._vae = load_vae(self.vae_name, device)
        return self._vae.to(device)

    def _affine(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.scale.to(x.device).reshape(1, -1, 1, 1), self.bias.to(x.device).reshape(1, -1, 1, 1)

    @torch.no_grad()
    def encode_pixels(self, images):
        """[-1, 1] images -> raw latents cat(mean, std) of the VAE posterior (2C channels)."""
        vae = self.vae(images.device)
        x = (images.to(torch.float32) + 1) / 2  # the VAE sees [0, 1], as in NVlabs/edm2
        out = []
        for batch in x.split(self.batch_size):
            d = vae.encode(batch)["latent_dist"]
            out.append(torch.cat([d.mean, d.std], dim=1))
        return torch.cat(out)

    def encode_latents(self, raw, generator=None):
        """x = (mean + std * n) * scale + bias with n ~ N(0, I) (EDM2 App. B.1)."""
        mean, std = raw.to(torch.float32).chunk(2, dim=1)
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        scale, bias = self._affine(mean)
        return (mean + std * noise) * scale + bias

    @torch.no_grad()
    def decode(self, latents):
        """Final latents -> [-1, 1] images through the VAE decoder (pixels clipped to [0, 1] first)."""
        vae = self.vae(latents.device)
        scale, bias = self._affine(latents)
        x = (latents.to(torch.float32) - bias) / scale
        pixels = torch.cat([vae.decode(b)["sample"] for b in x.split(self.batch_size)])
        return pixels.clamp(0, 1) * 2 - 1


def encoder_config(loaded: Loaded) -> dict[str, Any] | None:
    """The `encoder` config a loaded checkpoint was trained with (None: pixels), read from its metadata."""
    if loaded.kind in ("edm-pickle", "edm2-pickle"):  # an official snapshot: NVlabs/edm2 records its encoder
        return edm2_encoder_config(loaded.meta.get("encoder"))
    config = loaded.meta.get("config")
    if isinstance(config, dict) and "train_config" in config:
        config = config["train_config"]  # a post-hoc EMA reconstruction keeps the training config inside
    if isinstance(config, dict) and isinstance(config.get("edm_snapshot"), dict):  # convert_edm_checkpoint.py
        return edm2_encoder_config(config["edm_snapshot"].get("encoder"))
    encoder = config.get("encoder") if isinstance(config, dict) else None
    return encoder if isinstance(encoder, dict) and encoder.get("_target_") else None


def edm2_encoder_config(record: dict | None) -> dict[str, Any] | None:
    """An NVlabs/edm2 encoder record (edmlab.checkpoints.edm) as a `_target_` config with the same scale and bias."""
    if not record or record.get("kind") != "sd_vae":
        return None
    final_std = 0.5
    raw_std = [final_std / s for s in record["scale"]]
    raw_mean = [-b / s for b, s in zip(record["bias"], record["scale"], strict=True)]  # final_mean = 0
    return {"_target_": "edmlab.encoders.StabilityVAEEncoder", "vae_name": record.get("vae_name")
            or "stabilityai/sd-vae-ft-mse", "raw_mean": raw_mean, "raw_std": raw_std, "final_mean": 0.0,
            "final_std": final_std}
