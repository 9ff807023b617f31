"""Checkpoints in and out: edmlab's inference checkpoint, and official EDM snapshot pickles read safely.

edmlab checkpoint: `torch.save` of a plain dict (format, version, network build kwargs, precond, config,
state_dict), readable with `torch.load(weights_only=True)`.

EDM snapshot (`network-snapshot-*.pkl` of NVlabs/edm): a pickle whose modules are `torch_utils.persistence`
objects, reduced to `_reconstruct_persistent_obj(meta)` with meta = dict(type, version, module_src,
class_name, state). NVlabs' loader `exec`s `module_src`; here a restricted unpickler turns every such object
into an inert record, allows only the globals that tensors and containers need, and edmlab rebuilds the
matching network from the recorded constructor arguments. Nothing stored in the file is ever run.
NVlabs/edm2 snapshots (`Precond` holding `unet` and the log-variance head, float16, plus the encoder's
latent scale/bias as numpy arrays) are read the same way (`_read_edm2_snapshot`).
"""

from __future__ import annotations

import _compat_pickle
import collections
import io
import os
import pickle
import warnings
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edmlab.networks import build
from edmlab.precond import Denoiser

__all__ = ["FORMAT", "VERSION", "CheckpointFormatError", "UnsafePickleError", "save_denoiser", "load_denoiser",
           "check_weights", "build_checked", "content_hash", "verify_hash",
           "load_edm_pickle", "read_edm_snapshot", "EDMSnapshot", "load", "load_weights", "PersistentRecord",
           "ModuleRecord"]

FORMAT, VERSION = "edmlab-denoiser", 1


class CheckpointFormatError(ValueError):
    """The file is not in the format the loader expects (or its contents contradict themselves)."""


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle names a global outside the EDM snapshot allowlist; nothing from it was run."""


# --------------------------------------------------------------------------- weights


def load_weights(module: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Strict load by name; the error names the first missing or mismatching tensor (in module order)."""
    check_weights(module, state_dict, source)
    module.load_state_dict(dict(state_dict), strict=True)


def build_checked(network: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor], source: str,
                  prefix: str = "") -> nn.Module:
    """`edmlab.networks.build(**network)` once the tensors under `prefix` fit it, checked on the meta device:
    a file declaring a huge network is refused before any memory is allocated for it."""
    with torch.device("meta"):
        probe = build(**network)
    check_weights(probe, {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}, source, prefix)
    return build(**network)


def check_weights(module: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str = "checkpoint",
                  prefix: str = "") -> None:
    """Raise CheckpointFormatError naming (with `prefix`) the first tensor missing, of another shape, or unexpected."""
    expected = module.state_dict()
    for name, tensor in expected.items():
        if name not in state_dict:
            raise CheckpointFormatError(f"{source}: tensor {prefix + name!r} of the network is missing from the "
                                        f"checkpoint ({len(state_dict)} tensors given, {len(expected)} expected)")
        given = state_dict[name]
        if tuple(given.shape) != tuple(tensor.shape):
            raise CheckpointFormatError(f"{source}: tensor {prefix + name!r} has shape {tuple(given.shape)} in the "
                                        f"checkpoint but {tuple(tensor.shape)} in the network built from its config")
    unexpected = [prefix + name for name in state_dict if name not in expected]
    if unexpected:
        raise CheckpointFormatError(f"{source}: the checkpoint has tensors the network does not: "
                                    f"{', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}")


# --------------------------------------------------------------------------- edmlab checkpoint


def content_hash(state_dict: Mapping[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes (sorted by name): catches silent bit flips."""
    import hashlib

    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def verify_hash(state_dict: Mapping[str, torch.Tensor], expected: str | None, source: str) -> None:
    """Raise CheckpointFormatError when the tensors do not hash to `expected` (None: file without a hash)."""
    if expected is not None and content_hash(state_dict) != expected:
        raise CheckpointFormatError(f"{source}: the tensors do not match the content hash stored at save time: the "
                                    "file is corrupted (disk or transfer bit flips); use another copy, or pass "
                                    "verify=False (sample.py verify_hash=false) to load it anyway")


def _plain_config(value: Any, where: str = "config") -> Any:
    """A resolved config as plain dict/list/scalars (what `torch.load(weights_only=True)` accepts)."""
    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(value):
            value = OmegaConf.to_container(value, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a dependency; plain dicts need no conversion
        pass
    if isinstance(value, Mapping):
        return {str(k): _plain_config(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain_config(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if value is None or isinstance(value, str | bool | int | float | torch.Tensor):
        return value
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{where}: cannot store a {type(value).__name__} in an edmlab checkpoint; "
                    "use plain dicts, lists, strings and numbers")


def save_denoiser(denoiser: Denoiser, path: str | os.PathLike, config: Any = None,
                  global_step: int | None = None) -> Path:
    """Write edmlab's inference checkpoint atomically; `global_step` records the training step it comes from."""
    from edmlab.fileio import atomic_torch_save

    build_config = getattr(denoiser.net, "build_config", None)
    if build_config is None:
        raise ValueError("denoiser.net has no build_config: build networks with edmlab.networks.build so "
                         "the checkpoint can rebuild them")
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "network": _plain_config(build_config, "network"),
        "precond": {"kind": denoiser.kind, **_plain_config(denoiser.precond_params, "precond")},
        "config": _plain_config(config),
        "global_step": None if global_step is None else int(global_step),
        "state_dict": {k: v.detach().cpu() for k, v in denoiser.state_dict().items()},
    }
    payload["sha256"] = content_hash(payload["state_dict"])
    return atomic_torch_save(payload, path)


def _is_pickle(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(1) == b"\x80"


def load_denoiser(path: str | os.PathLike, map_location: Any = "cpu", verify: bool = True) -> Denoiser:
    """Read an edmlab inference checkpoint (weights_only) and rebuild its Denoiser, in eval mode.

    `verify` checks the tensors against the content hash stored at save time (skip it for speed)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    if not zipfile.is_zipfile(path):
        hint = (" It is a pickle: official EDM snapshots (network-snapshot-*.pkl) load with "
                "edmlab.interop.load_edm_pickle." if _is_pickle(path) else "")
        raise CheckpointFormatError(f"{path} is not an edmlab checkpoint (expected a torch.save archive with "
                                    f"format {FORMAT!r}).{hint}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        raise CheckpointFormatError(f"{path} is not an edmlab checkpoint: torch.load(weights_only=True) "
                                    f"refused it ({err})") from err
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        found = f"keys {sorted(map(str, ckpt))[:8]}" if isinstance(ckpt, dict) else f"a {type(ckpt).__name__}"
        lightning = isinstance(ckpt, dict) and "pytorch-lightning_version" in ckpt
        hint = (" It looks like a Lightning training checkpoint: its EMA denoiser loads with "
                "edmlab.generate.load_denoiser_any (or sample.py ckpt=...)." if lightning else "")
        raise CheckpointFormatError(f"{path} is not an edmlab checkpoint: expected a dict with format={FORMAT!r}, "
                                    f"found {found}.{hint}")
    if ckpt.get("version") != VERSION:
        raise CheckpointFormatError(f"{path}: edmlab checkpoint version {ckpt.get('version')!r} is not supported "
                                    f"(this edmlab reads version {VERSION})")
    if verify:
        verify_hash(ckpt["state_dict"], ckpt.get("sha256"), str(path))
    network, precond = dict(ckpt["network"]), dict(ckpt["precond"])
    denoiser = Denoiser(build_checked(network, ckpt["state_dict"], str(path), prefix="net."), **precond)
    load_weights(denoiser, ckpt["state_dict"], source=str(path))
    return denoiser.to(map_location if isinstance(map_location, str | torch.device) else "cpu").eval()


# --------------------------------------------------------------------------- EDM snapshot records


@dataclass
class PersistentRecord:
    """What `torch_utils.persistence._reconstruct_persistent_obj(meta)` would have rebuilt, kept as data."""

    class_name: str
    version: int | None
    state: dict
    module_src_chars: int = 0  # the pickled source is kept out: it is never needed, never run

    @property
    def init_kwargs(self) -> dict | None:
        kwargs = self.state.get("_init_kwargs")
        return dict(kwargs) if kwargs is not None else None


class ModuleRecord:
    """An inert stand-in for a torch.nn container (ModuleDict, ...): holds the pickled __dict__ only."""

    class_path = "torch.nn.Module"

    def __setstate__(self, state: dict) -> None:
        self.state = dict(state)


class _EasyDict(dict):
    """dnnlib.EasyDict read as a plain dict (the subclass only gives pickle's BUILD a __dict__ to fill)."""


def _reconstruct_persistent(meta: Mapping) -> PersistentRecord:
    if not isinstance(meta, Mapping) or "class_name" not in meta or "state" not in meta:
        raise UnsafePickleError("torch_utils.persistence record without class_name/state")
    state = meta["state"]
    return PersistentRecord(class_name=str(meta["class_name"]), version=meta.get("version"),
                            state=dict(state) if isinstance(state, Mapping) else {},
                            module_src_chars=len(meta.get("module_src") or ""))


def _load_storage(data: bytes) -> Any:
    # The storage bytes are a legacy torch.save file; weights_only keeps that nested load safe too.
    if not isinstance(data, bytes):
        raise UnsafePickleError("torch.storage._load_from_bytes expects bytes")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        storage = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    if not isinstance(storage, torch.storage.TypedStorage):
        raise UnsafePickleError(f"storage bytes decoded to a {type(storage).__name__}, not a typed storage")
    return storage


def _rebuild_tensor(storage: Any, storage_offset: int, size: tuple, stride: tuple, *_ignored: Any) -> torch.Tensor:
    # requires_grad, backward hooks and tensor metadata are dropped: hooks would be callables.
    if not isinstance(storage, torch.storage.TypedStorage):
        raise UnsafePickleError(f"tensor rebuilt from a {type(storage).__name__}, not a typed storage")
    return torch._utils._rebuild_tensor(storage, int(storage_offset), tuple(size), tuple(stride))


def _rebuild_parameter(data: torch.Tensor, *_ignored: Any) -> torch.Tensor:
    if not isinstance(data, torch.Tensor):
        raise UnsafePickleError("parameter rebuilt from a non-tensor")
    return data


def _numpy_scalar(dtype: Any, data: Any = None) -> int | float | bool | complex:
    # numpy scalars appear in EDM's recorded kwargs (e.g. skip_scale=np.sqrt(0.5)); object dtypes are code.
    if not isinstance(dtype, np.dtype) or dtype.hasobject or not isinstance(data, bytes):
        raise UnsafePickleError("only numeric numpy scalars are allowed")
    return np.frombuffer(data, dtype=dtype)[0].item()


def _numpy_dtype(name: Any, align: Any = False, copy: Any = False) -> np.dtype:
    if not isinstance(name, str):
        raise UnsafePickleError("numpy.dtype expects a type string")
    dtype = np.dtype(name)
    if dtype.hasobject:
        raise UnsafePickleError("numpy object dtypes are not allowed")
    return dtype


def _numpy_array(cls: Any, shape: Any = (0,), dtype: Any = b"b") -> np.ndarray:
    # numpy's _reconstruct(ndarray, (0,), b'b') + BUILD (ndarray.__setstate__) with a dtype already screened
    # by _numpy_dtype: EDM2's StabilityVAEEncoder keeps its latent scale and bias as float32 arrays.
    if cls is not np.ndarray:
        raise UnsafePickleError("numpy _reconstruct is only allowed for plain ndarrays")
    return np.ndarray.__new__(np.ndarray, (0,), np.uint8)


def _reconstructor(cls: Any, base: Any, state: Any = None) -> Any:
    # copyreg._reconstructor as protocol-0/1 pickles use it, limited to the inert record types.
    if not (isinstance(cls, type) and issubclass(cls, ModuleRecord | _EasyDict)):
        raise UnsafePickleError(f"copyreg._reconstructor on {cls!r} refused")
    return cls.__new__(cls)


def _encode(text: str, encoding: str = "latin1") -> bytes:
    # How protocol-2 pickles written by Python 3 store bytes.
    if not isinstance(text, str) or encoding != "latin1":
        raise UnsafePickleError("_codecs.encode is only allowed as latin1 bytes encoding")
    return text.encode("latin1")


_ALLOWED: dict[tuple[str, str], Any] = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _reconstruct_persistent,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _load_storage,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("dnnlib.util", "EasyDict"): _EasyDict,
    ("dnnlib", "EasyDict"): _EasyDict,
    ("numpy", "dtype"): _numpy_dtype,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("copyreg", "_reconstructor"): _reconstructor,
    ("numpy.core.multiarray", "_reconstruct"): _numpy_array,
    ("numpy._core.multiarray", "_reconstruct"): _numpy_array,
    ("numpy", "ndarray"): np.ndarray,
    ("builtins", "object"): object,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("_codecs", "encode"): _encode,
    ("torch", "device"): torch.device,
}
_module_records: dict[str, type[ModuleRecord]] = {}


class _SnapshotUnpickler(pickle.Unpickler):
    """Unpickler that resolves only `_ALLOWED` globals (plus torch dtypes and torch.nn classes as records)."""

    def __init__(self, file: Any, source: str) -> None:
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        # Python-2 names (protocols 0-2), translated as pickle's own find_class does.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module.startswith("torch.nn.modules.") and name.isidentifier():
            path = f"{module}.{name}"
            if path not in _module_records:
                _module_records[path] = type(name, (ModuleRecord,), {"class_path": path})
            return _module_records[path]
        raise UnsafePickleError(f"{self.source}: refused to load global '{module}.{name}'. An EDM snapshot "
                                "needs only tensors, storages, containers and torch_utils.persistence records; "
                                "edmlab never runs code from a checkpoint")

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"{self.source}: persistent id {pid!r} refused (EDM snapshots have none)")


def _state_of(record: Any) -> dict:
    return record.state if isinstance(record, PersistentRecord | ModuleRecord) else {}


def _named_tensors(record: Any, prefix: str = "", _path: tuple[int, ...] = ()) -> Iterator[tuple[str, torch.Tensor]]:
    """The state_dict of a recorded module: parameters, persistent buffers, then submodules (nn.Module order)."""
    if id(record) in _path:
        raise CheckpointFormatError(f"the module tree has a cycle: {prefix.rstrip('.') or 'the top module'} "
                                    "contains a module that contains it; not a network snapshot")
    state = _state_of(record)
    for name, tensor in (state.get("_parameters") or {}).items():
        if tensor is not None:
            yield prefix + name, tensor
    skip = set(state.get("_non_persistent_buffers_set") or ())
    for name, tensor in (state.get("_buffers") or {}).items():
        if tensor is not None and name not in skip:
            yield prefix + name, tensor
    for name, child in (state.get("_modules") or {}).items():
        if child is not None:
            yield from _named_tensors(child, f"{prefix}{name}.", (*_path, id(record)))


# --------------------------------------------------------------------------- EDM -> edmlab mapping

# EDM precond class -> (edmlab kind, its constants with EDM's defaults).
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
                                    "(edmlab checkpoints load with edmlab.interop.load_denoiser)")
    try:
        with open(path, "rb") as f:
            data = _SnapshotUnpickler(f, source).load()
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
    kind, defaults = _PRECONDS[precond.class_name]
    precond_kwargs = precond.init_kwargs or {k: precond.state[k] for k in defaults if k in precond.state}
    params = {k: precond_kwargs.get(k, default) for k, default in defaults.items()}
    if kind == "edm" and (precond_kwargs.get("sigma_min", 0) != 0 or
                          precond_kwargs.get("sigma_max", float("inf")) != float("inf")):
        warnings.warn(f"{source}: EDMPrecond sigma_min/sigma_max {precond_kwargs.get('sigma_min')}/"
                      f"{precond_kwargs.get('sigma_max')} are not kept; pass them to the sampler", stacklevel=2)

    model = (precond.state.get("_modules") or {}).get("model")
    if model is None:
        raise CheckpointFormatError(f"{source}: {precond.class_name} has no 'model' submodule")
    class_name, model_kwargs = _model_kwargs(precond, model, source)
    try:
        tensors = dict(_named_tensors(model))
    except CheckpointFormatError as err:
        raise CheckpointFormatError(f"{source}: {err}") from None
    weights = f"{source} ({class_name} weights)"
    net = _build_from_edm(class_name, model_kwargs, source, tensors, weights)
    denoiser = Denoiser(net, kind=kind, **params)
    load_weights(net, tensors, source=weights)
    return EDMSnapshot(denoiser=denoiser.eval(), precond_class=precond.class_name,
                       loss=_plain_record(data.get("loss_fn")), augment_pipe=_plain_record(data.get("augment_pipe")),
                       dataset_kwargs=_plain_record(dict(data.get("dataset_kwargs") or {})))


def load_edm_pickle(path: str | os.PathLike, key: str = "ema") -> Denoiser:
    """The denoiser of an official EDM snapshot (`snapshot['ema']`), as an edmlab Denoiser in eval mode."""
    return read_edm_snapshot(path, key).denoiser


def load(path: str | os.PathLike, map_location: Any = "cpu") -> Denoiser:
    """Any supported checkpoint: an edmlab checkpoint (zip) or an official EDM snapshot pickle."""
    if Path(path).is_file() and zipfile.is_zipfile(path):
        return load_denoiser(path, map_location=map_location)
    return load_edm_pickle(path).to(map_location)


# --------------------------------------------------------------------------- EDM2 snapshots (NVlabs/edm2)

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
    logvar = _named_tensors(modules["logvar_linear"], "logvar_linear.")
    denoiser = Denoiser(net, kind="edm", sigma_data=float(kwargs.get("sigma_data", 0.5)),
                        logvar_channels=int(next(logvar)[1].shape[1]))
    tensors = {**{f"net.{k}": v for k, v in _named_tensors(unet)},
               **dict(_named_tensors(modules.get("logvar_fourier"), "logvar_fourier.")),
               **dict(_named_tensors(modules["logvar_linear"], "logvar_linear."))}
    load_weights(denoiser, {k: v.float() for k, v in tensors.items()}, source=f"{source} (EDM2 Precond weights)")
    return EDMSnapshot(denoiser=denoiser.eval(), precond_class="Precond", loss=_plain_record(data.get("loss_fn")),
                       augment_pipe=None, dataset_kwargs=_plain_record(dict(data.get("dataset_kwargs") or {})),
                       encoder=_edm2_encoder(data.get("encoder")))
