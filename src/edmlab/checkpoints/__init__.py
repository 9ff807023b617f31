"""Checkpoints: one module per file format, each with its writer and reader, one resolver, one loader.

| file                                    | format                                   | module        |
|-----------------------------------------|------------------------------------------|---------------|
| `last_ema.pt`, `network-snapshot-*.pt`  | edmlab inference export (`FORMAT`)        | `export`      |
| `last.ckpt`                             | Lightning training state + `["edmlab"]`  | `training`    |
| `network-snapshot-*.pkl` (NVlabs)       | EDM / EDM2 snapshot pickle               | `edm`         |
| `phema-*.pt`                            | post-hoc EMA snapshots                   | `phema`       |

`resolve` turns a file, a run folder or `last` into a file; `loader.load_any` reads any of the first three kinds
into a `Loaded` (denoiser, kind, path, step, metadata). `safe_pickle` is the one allowlist unpickler (EDM
snapshots here, CIFAR batches in `edmlab.data`); `weights` holds the strict loads and content hashes every
format shares; `errors` the exceptions every reader raises.
"""

from edmlab.checkpoints.edm import EDMSnapshot, load_edm_pickle, read_edm_snapshot
from edmlab.checkpoints.errors import CheckpointFormatError, IncompatibleCheckpoint, UnsafePickleError
from edmlab.checkpoints.export import load_denoiser, save_denoiser
from edmlab.checkpoints.loader import Loaded, load_any
from edmlab.checkpoints.resolve import resolve
from edmlab.checkpoints.training import (
    CHECKPOINT_KEY,
    CKPT_DIR,
    CKPT_NAME,
    EMA_PREFIX,
    EXPORT_NAME,
    load_training_checkpoint,
    read_metadata,
    saved_step,
)
from edmlab.checkpoints.weights import content_hash

__all__ = ["CHECKPOINT_KEY", "CKPT_DIR", "CKPT_NAME", "EMA_PREFIX", "EXPORT_NAME",
           "CheckpointFormatError", "IncompatibleCheckpoint", "UnsafePickleError",
           "EDMSnapshot", "Loaded", "content_hash", "load_any", "load_denoiser", "load_edm_pickle",
           "load_training_checkpoint", "read_edm_snapshot", "read_metadata", "resolve", "save_denoiser", "saved_step"]
