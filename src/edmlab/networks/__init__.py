"""Networks F(x; c_noise) for the denoiser: DDPM++, NCSN++ (Song U-Net), ADM (Dhariwal U-Net), EDM2's
magnitude-preserving U-Net and an MLP.

`build(name, ...)` is the one entry point; its defaults are the settings of EDM's paper runs
(`train.py` of NVlabs/edm: CIFAR-10 for the Song U-Nets, ImageNet-64 for ADM).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from edmlab.networks.adm_unet import DhariwalUNet
from edmlab.networks.edm2_unet import EDM2_PRESETS, EDM2UNet
from edmlab.networks.mlp import MLP
from edmlab.networks.song_unet import SongUNet

__all__ = ["build", "data_shape", "PRESETS", "NAMES", "SongUNet", "DhariwalUNet", "MLP", "EDM2UNet", "EDM2_PRESETS",
           "num_parameters"]

# name -> (class, defaults). Song U-Nets: EDM train.py --arch=ddpmpp|ncsnpp on CIFAR-10 (--dropout 0.13);
# ADM: EDM's ImageNet-64 run (--arch=adm, --dropout 0.10, class defaults otherwise).
PRESETS: dict[str, tuple[type[nn.Module], dict[str, Any]]] = {
    "ddpmpp": (SongUNet, dict(model_channels=128, channel_mult=[2, 2, 2], channel_mult_emb=4, num_blocks=4,
                              attn_resolutions=[16], dropout=0.13, embedding_type="positional",
                              channel_mult_noise=1, encoder_type="standard", decoder_type="standard",
                              resample_filter=[1, 1])),
    "ncsnpp": (SongUNet, dict(model_channels=128, channel_mult=[2, 2, 2], channel_mult_emb=4, num_blocks=4,
                              attn_resolutions=[16], dropout=0.13, embedding_type="fourier",
                              channel_mult_noise=2, encoder_type="residual", decoder_type="standard",
                              resample_filter=[1, 3, 3, 1])),
    "adm": (DhariwalUNet, dict(model_channels=192, channel_mult=[1, 2, 3, 4], channel_mult_emb=4, num_blocks=3,
                               attn_resolutions=[32, 16, 8], dropout=0.10)),
    "mlp": (MLP, dict(hidden_channels=256, num_blocks=4, emb_channels=128, embedding_type="positional",
                      dropout=0.0)),
    # EDM2: NVlabs' UNet defaults (model_channels 192 = the S preset; EDM2_PRESETS holds the others).
    "edm2": (EDM2UNet, dict(model_channels=192, channel_mult=[1, 2, 3, 4], num_blocks=3, attn_resolutions=[16, 8],
                            dropout=0.0)),
}
NAMES = tuple(PRESETS)


def _plain(value: Any) -> Any:
    """Hydra/OmegaConf containers and tuples -> plain dicts and lists (checkpoints stay weights_only-loadable)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        return [_plain(v) for v in value]
    return value


def build(name: str, *, img_resolution: int, img_channels: int, label_dim: int = 0, augment_dim: int = 0,
          **overrides: Any) -> nn.Module:
    """The network `name` (ddpmpp, ncsnpp, adm, edm2, mlp) with EDM's defaults updated by `overrides`.

    The result carries `build_config`, the keyword arguments that rebuild it: `build(**net.build_config)`.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown network {name!r}; valid names: {', '.join(NAMES)}")
    cls, defaults = PRESETS[name]
    valid = [p for p in inspect.signature(cls).parameters if p not in ("img_resolution", "img_channels")]
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        raise ValueError(f"network {name!r} has no option(s) {', '.join(unknown)}; valid options: "
                         f"{', '.join(valid)}")
    overrides = _plain(overrides)
    net = cls(img_resolution=int(img_resolution), img_channels=int(img_channels), label_dim=int(label_dim),
              augment_dim=int(augment_dim), **{**defaults, **overrides})
    net.build_config = dict(name=name, img_resolution=int(img_resolution), img_channels=int(img_channels),
                            label_dim=int(label_dim), augment_dim=int(augment_dim), **overrides)
    return net


def data_shape(config: Mapping[str, Any]) -> tuple[int, ...]:
    """The shape of one sample of `build(**config)`: [d] for the MLP on vectors (img_resolution 1), else [C, H, W]."""
    res, ch = int(config["img_resolution"]), int(config["img_channels"])
    return (ch,) if config["name"] == "mlp" and res == 1 else (ch, res, res)


def num_parameters(net: nn.Module) -> int:
    """Number of trainable-parameter elements (buffers such as NCSN++'s Fourier frequencies excluded)."""
    return sum(p.numel() for p in net.parameters())
