"""The one restricted unpickler: globals resolve only through an allowlist, nothing stored in a file is run.

`AllowlistUnpickler` takes an `Allowlist` (a table of (module, name) -> screened object, the refusal
message, optionally a rule for whole families of harmless names). `SNAPSHOT_GLOBALS` is the EDM snapshot's;
`edmlab.data.cifar10` keeps the CIFAR batch's.

NVlabs' snapshots hold `torch_utils.persistence` objects reduced to `_reconstruct_persistent_obj(meta)`
with meta = dict(type, version, module_src, class_name, state); NVlabs' loader `exec`s `module_src`.
Here each such object becomes an inert `PersistentRecord`, torch.nn containers become `ModuleRecord`s,
and tensors, storages, containers and numeric numpy values are rebuilt by screened functions.
"""

from __future__ import annotations

import _compat_pickle
import codecs
import collections
import io
import pickle
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from edmlab.checkpoints.errors import CheckpointFormatError, UnsafePickleError

__all__ = ["Allowlist", "AllowlistUnpickler", "SNAPSHOT_GLOBALS", "PersistentRecord", "ModuleRecord", "latin1_bytes",
           "named_tensors", "state_of"]


@dataclass(frozen=True)
class Allowlist:
    """What one file format may name: `globals` maps (module, name) to the object the unpickler hands back."""

    globals: Mapping[tuple[str, str], Any]
    refusal: str  # the error for any other global; "{name}" becomes its dotted name
    # whole families of harmless names (torch dtypes, ...): the object, or None to refuse
    family: Callable[[str, str], Any] | None = None


class AllowlistUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals of its `Allowlist` and refuses persistent ids (UnsafePickleError).

    `source` (a file name) prefixes the errors; other keyword arguments go to pickle.Unpickler (e.g. encoding)."""

    def __init__(self, file: Any, allowlist: Allowlist, source: str = "", **kwargs: Any) -> None:
        super().__init__(file, **kwargs)
        self.allowlist = allowlist
        self.where = f"{source}: " if source else ""

    def find_class(self, module: str, name: str) -> Any:
        # Python-2 names (protocols 0-2), translated as pickle's own find_class does, then looked up in the list.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        found = self.allowlist.globals.get((module, name))
        if found is None and self.allowlist.family is not None:
            found = self.allowlist.family(module, name)
        if found is None:
            raise UnsafePickleError(self.where + self.allowlist.refusal.format(name=f"{module}.{name}"))
        return found

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"{self.where}persistent id {pid!r} refused (none of edmlab's pickled formats "
                                "uses them)")


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


def latin1_bytes(text: Any, encoding: str = "latin1") -> bytes:
    """`_codecs.encode(str, "latin1")`, how protocol-2 pickles written by Python 3 store bytes; no other codec."""
    try:
        latin1 = isinstance(text, str) and codecs.lookup(encoding).name == "iso8859-1"
    except (LookupError, TypeError):  # an unknown codec name, or not a name at all
        latin1 = False
    if not latin1:
        raise UnsafePickleError(f"refusing _codecs.encode with encoding {encoding!r} (only latin1 bytes are allowed)")
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
    ("_codecs", "encode"): latin1_bytes,
    ("torch", "device"): torch.device,
}


_module_records: dict[str, type[ModuleRecord]] = {}


def _snapshot_family(module: str, name: str) -> Any:
    """torch dtypes as themselves, any torch.nn module class as an inert record; None for anything else."""
    if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
        return getattr(torch, name)
    if module.startswith("torch.nn.modules.") and name.isidentifier():
        path = f"{module}.{name}"
        if path not in _module_records:
            _module_records[path] = type(name, (ModuleRecord,), {"class_path": path})
        return _module_records[path]
    return None


SNAPSHOT_GLOBALS = Allowlist(
    _ALLOWED, "refused to load global '{name}'. An EDM snapshot needs only tensors, storages, containers and "
    "torch_utils.persistence records; edmlab never runs code from a checkpoint", _snapshot_family)


def state_of(record: Any) -> dict:
    return record.state if isinstance(record, PersistentRecord | ModuleRecord) else {}


def named_tensors(record: Any, prefix: str = "", _path: tuple[int, ...] = ()) -> Iterator[tuple[str, torch.Tensor]]:
    """The state_dict of a recorded module: parameters, persistent buffers, then submodules (nn.Module order)."""
    if id(record) in _path:
        raise CheckpointFormatError(f"the module tree has a cycle: {prefix.rstrip('.') or 'the top module'} "
                                    "contains a module that contains it; not a network snapshot")
    state = state_of(record)
    for name, tensor in (state.get("_parameters") or {}).items():
        if tensor is not None:
            yield prefix + name, tensor
    skip = set(state.get("_non_persistent_buffers_set") or ())
    for name, tensor in (state.get("_buffers") or {}).items():
        if tensor is not None and name not in skip:
            yield prefix + name, tensor
    for name, child in (state.get("_modules") or {}).items():
        if child is not None:
            yield from named_tensors(child, f"{prefix}{name}.", (*_path, id(record)))
