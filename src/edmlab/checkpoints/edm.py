"""Official NVlabs/edm and NVlabs/edm2 snapshot pickles, read as data and rebuilt as edmlab Denoisers.

`network-snapshot-*.pkl` is unpickled by `safe_pickle.AllowlistUnpickler` (nothing in it is run); the
recorded constructor arguments of the precond and network classes choose the matching edmlab network,
whose state-dict names equal NVlabs', so the weights load by name. EDM2 snapshots (`Precond` holding
`unet` and the log-variance head, float16, plus the encoder's latent scale/bias) are read the same way.
"""

from __future__ import annotations

import os
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edmlab.checkpoints.errors import CheckpointFormatError, UnsafePickleError
from edmlab.checkpoints.safe_pickle import SNAPSHOT_GLOBALS, AllowlistUnpickler, PersistentRecord, named_tensors
from edmlab.checkpoints.weights import build_checked, load_weights
from edmlab.networks import build
from edmlab.precond import Denoiser

__all__ = ["EDMSnapshot", "read_edm_snapshot", "load_edm_pickle"]


# EDM precond class -> (edmlab precond name, its constants with EDM's defaults).
_PRECONDS: dict[str, tuple[str, dict[str, Any]]] = {
    "EDMPrecond": ("edm", dict(sigma_data=0.5)),
    "VPPrecond": ("vp", dict(beta_d=19.9, beta_min=0.1, M=1000, epsilon_t=1e-5)),
    "VEPrecond": ("ve", dict(sigma_min=0.02, sigma_max=100.0)),
    "iDDPMPrecond": ("iddpm", dict(C_1=0.001, C_2=0.008, M=1000)),
}


# EDM network class -> its constructor defaults (the recorded kwargs hold only what train.py passed).
_NETWORK_DEFAULTS: dict[str, dict[str, Any]] = {
    "SongUNet": dict(label_dim=0, augment_dim=0, model_channels=128, channel_mult=[1, 2, 2, 2],
                     channel_mult_emb=4, num_blocks=4, attn_resolutions=[16], dropout=0.10, label_dropout=0,
                     embedding_type="positional", channel_mult_noise=1, encoder_type="standard",
                     decoder_type="standard", resample_filter=[1, 1]),
    "DhariwalUNet": dict(label_dim=0, augment_dim=0, model_channels=192, channel_mult=[1, 2, 3, 4],
                         channel_mult_emb=4, num_blocks=3, attn_resolutions=[32, 16, 8], dropout=0.10,
                         label_dropout=0),
}


_PRECOND_ONLY = {"img_resolution", "img_channels", "label_dim", "use_fp16", "model_type", "sigma_min", "sigma_max",
                 "sigma_data", "beta_d", "beta_min", "M", "epsilon_t", "C_1", "C_2"}


def _model_kwargs(precond: PersistentRecord, model: Any, source: str) -> tuple[str, dict[str, Any]]:
    """(EDM network class, its full constructor kwargs) from the model record, else from the precond's."""
    if isinstance(model, PersistentRecord) and model.init_kwargs is not None:
        if model.state.get("_init_args"):
            raise CheckpointFormatError(f"{source}: the {model.class_name} record has positional init args; "
                                        "EDM networks are built from keyword arguments only")
        return model.class_name, model.init_kwargs
    kwargs = precond.init_kwargs
    if kwargs is None:
        raise CheckpointFormatError(f"{source}: neither {precond.class_name} nor its model recorded constructor "
                                    "arguments (_init_kwargs); cannot tell which network to build")
    class_name = kwargs.get("model_type", "SongUNet" if precond.class_name in ("VPPrecond", "VEPrecond")
                            else "DhariwalUNet")
    out = kwargs["img_channels"] * (2 if precond.class_name == "iDDPMPrecond" else 1)
    model_kwargs = {k: v for k, v in kwargs.items() if k not in _PRECOND_ONLY}
    return class_name, dict(img_resolution=kwargs["img_resolution"], in_channels=kwargs["img_channels"],
                            out_channels=out, label_dim=kwargs.get("label_dim", 0), **model_kwargs)


def _build_from_edm(class_name: str, kwargs: dict[str, Any], source: str, tensors: Mapping[str, torch.Tensor],
                    weights: str) -> nn.Module:
    """The edmlab network equivalent to EDM's `class_name(**kwargs)`."""
    if class_name not in _NETWORK_DEFAULTS:
        raise CheckpointFormatError(f"{source}: network class {class_name!r} is not supported; edmlab maps "
                                    f"{', '.join(_NETWORK_DEFAULTS)}")
    kwargs = {**_NETWORK_DEFAULTS[class_name], **kwargs}
    try:
        img_resolution, img_channels = kwargs.pop("img_resolution"), kwargs.pop("in_channels")
    except KeyError as err:
        raise CheckpointFormatError(f"{source}: {class_name} kwargs lack {err}") from err
    out_channels = kwargs.pop("out_channels", img_channels)
    unknown = sorted(set(kwargs) - set(_NETWORK_DEFAULTS[class_name]))
    if unknown:
        raise CheckpointFormatError(f"{source}: {class_name} option(s) {', '.join(unknown)} are not part of "
                                    "NVlabs/edm's network and have no edmlab equivalent")
    if out_channels != img_channels:
        kwargs["out_channels"] = out_channels
    if class_name == "SongUNet":
        name = "ncsnpp" if kwargs["embedding_type"] == "fourier" else "ddpmpp"
    else:
        name = "adm"
    return build_checked(dict(name=name, img_resolution=img_resolution, img_channels=img_channels, **kwargs), tensors,
                         weights)


def _plain_record(value: Any, depth: int = 0) -> Any:
    """Snapshot metadata (loss, augment pipe, dataset kwargs) as plain data for a config."""
    if depth > 64:  # settings are a few levels deep; deeper is a cycle or a crafted file
        raise CheckpointFormatError("snapshot metadata nested more than 64 levels (a cycle?); not an EDM snapshot")
    if isinstance(value, PersistentRecord):
        kwargs = value.init_kwargs
        if kwargs is None:
            kwargs = {k: v for k, v in value.state.items() if not k.startswith("_")}
        return {"class_name": value.class_name, "kwargs": _plain_record(kwargs, depth + 1)}
    if isinstance(value, Mapping):
        return {str(k): _plain_record(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain_record(v, depth + 1) for v in value]
    if value is None or isinstance(value, str | bool | int | float):
        return value
    return repr(value)


@dataclass
class EDMSnapshot:
    """An EDM snapshot read as data: the rebuilt denoiser plus the loss, augmentation and dataset settings."""

    denoiser: Denoiser
    precond_class: str
    loss: dict | None = None
    augment_pipe: dict | None = None
    dataset_kwargs: dict = field(default_factory=dict)
    encoder: dict | None = None  # EDM2: how the network's data maps to pixels (identity or the SD VAE)

    def metadata(self) -> dict:
        return {"precond_class": self.precond_class, "loss": self.loss, "augment_pipe": self.augment_pipe,
                "dataset_kwargs": self.dataset_kwargs, "encoder": self.encoder}


def read_edm_snapshot(path: str | os.PathLike, key: str = "ema") -> EDMSnapshot:
    """Read an official EDM `network-snapshot-*.pkl` without NVlabs code and without running anything in it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no EDM snapshot at {path}")
    source = str(path)
    if zipfile.is_zipfile(path):
        raise CheckpointFormatError(f"{source} is a torch.save archive, not an EDM snapshot pickle "
                                    "(edmlab checkpoints load with edmlab.checkpoints.load_denoiser)")
    try:
        with open(path, "rb") as f:
            data = AllowlistUnpickler(f, SNAPSHOT_GLOBALS, source).load()
    except UnsafePickleError:
        raise
    except Exception as err:
        raise CheckpointFormatError(f"{source} is not an EDM snapshot pickle: unpickling failed ({err})") from err
    if not isinstance(data, Mapping) or key not in data:
        found = f"keys {sorted(map(str, data))}" if isinstance(data, Mapping) else f"a {type(data).__name__}"
        raise CheckpointFormatError(f"{source} is not an EDM network snapshot: expected a dict with "
                                    f"{key!r}, 'loss_fn', 'augment_pipe', 'dataset_kwargs'; found {found}")
    precond = data[key]
    if not isinstance(precond, PersistentRecord):
        raise CheckpointFormatError(f"{source}: snapshot[{key!r}] is not a torch_utils.persistence object")
    if precond.class_name == "Precond":
        return _read_edm2_snapshot(data, precond, source)
    if precond.class_name not in _PRECONDS:
        raise CheckpointFormatError(f"{source}: preconditioning class {precond.class_name!r} is not supported; "
                                    f"edmlab maps {', '.join(_PRECONDS)}")
    name, defaults = _PRECONDS[precond.class_name]
    precond_kwargs = precond.init_kwargs or {k: precond.state[k] for k in defaults if k in precond.state}
    params = {k: precond_kwargs.get(k, default) for k, default in defaults.items()}
    if name == "edm" and (precond_kwargs.get("sigma_min", 0) != 0 or
                          precond_kwargs.get("sigma_max", float("inf")) != float("inf")):
        warnings.warn(f"{source}: EDMPrecond sigma_min/sigma_max {precond_kwargs.get('sigma_min')}/"
                      f"{precond_kwargs.get('sigma_max')} are not kept; pass them to the sampler", stacklevel=2)

    model = (precond.state.get("_modules") or {}).get("model")
    if model is None:
        raise CheckpointFormatError(f"{source}: {precond.class_name} has no 'model' submodule")
    class_name, model_kwargs = _model_kwargs(precond, model, source)
    try:
        tensors = dict(named_tensors(model))
    except CheckpointFormatError as err:
        raise CheckpointFormatError(f"{source}: {err}") from None
    weights = f"{source} ({class_name} weights)"
    net = _build_from_edm(class_name, model_kwargs, source, tensors, weights)
    denoiser = Denoiser(net, name=name, **params)
    load_weights(net, tensors, source=weights)
    return EDMSnapshot(denoiser=denoiser.eval(), precond_class=precond.class_name,
                       loss=_plain_record(data.get("loss_fn")), augment_pipe=_plain_record(data.get("augment_pipe")),
                       dataset_kwargs=_plain_record(dict(data.get("dataset_kwargs") or {})))


def load_edm_pickle(path: str | os.PathLike, key: str = "ema") -> Denoiser:
    """The denoiser of an official EDM snapshot (`snapshot['ema']`), as an edmlab Denoiser in eval mode."""
    return read_edm_snapshot(path, key).denoiser


_EDM2_PRECOND_ONLY = {"img_resolution", "img_channels", "label_dim", "use_fp16", "sigma_data", "logvar_channels"}


def _edm2_encoder(record: Any) -> dict | None:
    """NVlabs/edm2's encoder as data: kind, VAE name and the latent scale/bias (final = raw * scale + bias)."""
    if not isinstance(record, PersistentRecord):
        return None
    if record.class_name == "StandardRGBEncoder":
        return {"kind": "identity"}
    state = record.state
    scale, bias = np.asarray(state.get("scale", 1), np.float64), np.asarray(state.get("bias", 0), np.float64)
    return {"kind": "sd_vae", "class_name": record.class_name, "vae_name": state.get("vae_name"),
            "scale": scale.reshape(-1).tolist(), "bias": bias.reshape(-1).tolist()}


def _read_edm2_snapshot(data: Mapping, precond: PersistentRecord, source: str) -> EDMSnapshot:
    """EDM2's `Precond` (U-Net `unet` + log-variance head) as an edmlab Denoiser with logvar_channels."""
    modules = precond.state.get("_modules") or {}
    unet = modules.get("unet")
    if unet is None or "logvar_linear" not in modules:
        raise CheckpointFormatError(f"{source}: preconditioning class 'Precond' is not supported unless it is "
                                    f"NVlabs/edm2's (submodules unet, logvar_fourier, logvar_linear; found "
                                    f"{', '.join(modules) or 'none'})")
    kwargs = precond.init_kwargs
    if kwargs is None:
        raise CheckpointFormatError(f"{source}: EDM2 Precond recorded no constructor arguments (_init_kwargs)")
    net_kwargs = {k: v for k, v in kwargs.items() if k not in _EDM2_PRECOND_ONLY}
    try:
        net = build("edm2", img_resolution=kwargs["img_resolution"], img_channels=kwargs["img_channels"],
                    label_dim=kwargs.get("label_dim", 0), **net_kwargs)
    except ValueError as err:
        raise CheckpointFormatError(f"{source}: EDM2 U-Net kwargs have no edmlab equivalent: {err}") from err
    logvar = named_tensors(modules["logvar_linear"], "logvar_linear.")
    denoiser = Denoiser(net, name="edm", sigma_data=float(kwargs.get("sigma_data", 0.5)),
                        logvar_channels=int(next(logvar)[1].shape[1]))
    tensors = {**{f"net.{k}": v for k, v in named_tensors(unet)},
               **dict(named_tensors(modules.get("logvar_fourier"), "logvar_fourier.")),
               **dict(named_tensors(modules["logvar_linear"], "logvar_linear."))}
    load_weights(denoiser, {k: v.float() for k, v in tensors.items()}, source=f"{source} (EDM2 Precond weights)")
    return EDMSnapshot(denoiser=denoiser.eval(), precond_class="Precond", loss=_plain_record(data.get("loss_fn")),
                       augment_pipe=None, dataset_kwargs=_plain_record(dict(data.get("dataset_kwargs") or {})),
                       encoder=_edm2_encoder(data.get("encoder")))
