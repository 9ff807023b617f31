"""Checkpoints: one module per format, each with its writer and reader, one resolver, one loader.

- `export`: edmlab's inference checkpoint (`last_ema.pt`, `save_denoiser` / `load_denoiser`);
- `training`: the Lightning training checkpoint (`last.ckpt`) and its `checkpoint["edmlab"]` entry;
- `edm`: official NVlabs/edm and edm2 snapshot pickles, read through `safe_pickle` (nothing is run);
- `phema`: post-hoc EMA snapshots (`phema-*.pt`);
- `resolve`: a file, a run folder or `last` -> a file; any kind -> a Denoiser (`load_denoiser_any`);
- `weights`: strict loads naming the offending tensor, content hashes, plain configs.
"""

from edmlab.checkpoints.edm import EDMSnapshot, load_edm_pickle, read_edm_snapshot
from edmlab.checkpoints.errors import CheckpointFormatError, IncompatibleCheckpoint, UnsafePickleError
from edmlab.checkpoints.export import FORMAT, VERSION, load_denoiser, save_denoiser
from edmlab.checkpoints.resolve import ACCEPTED_KINDS, load_denoiser_any, resolve_checkpoint, resolve_ckpt_path
from edmlab.checkpoints.training import (
    CHECKPOINT_KEY,
    CKPT_NAME,
    EMA_PREFIX,
    EXPORT_NAME,
    load_training_checkpoint,
    read_metadata,
    saved_step,
)
from edmlab.checkpoints.weights import build_checked, check_weights, content_hash, load_weights, verify_hash

__all__ = ["ACCEPTED_KINDS", "CHECKPOINT_KEY", "CKPT_NAME", "EMA_PREFIX", "EXPORT_NAME", "FORMAT", "VERSION",
           "CheckpointFormatError", "IncompatibleCheckpoint", "UnsafePickleError", "EDMSnapshot",
           "build_checked", "check_weights", "content_hash", "load_denoiser", "load_denoiser_any",
           "load_edm_pickle", "load_training_checkpoint", "load_weights", "read_edm_snapshot", "read_metadata",
           "resolve_checkpoint", "resolve_ckpt_path", "save_denoiser", "saved_step", "verify_hash"]
