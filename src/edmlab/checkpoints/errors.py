"""The errors every checkpoint reader raises: a file of the wrong kind, an unsafe pickle, a run that does not fit."""

from __future__ import annotations

import pickle

__all__ = ["CheckpointFormatError", "UnsafePickleError", "IncompatibleCheckpoint"]


class CheckpointFormatError(ValueError):
    """The file is not in the format the loader expects (or its contents contradict themselves)."""


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle names a global outside its format's allowlist (safe_pickle); nothing from it was run."""


class IncompatibleCheckpoint(ValueError):
    """The checkpoint was written by a run with a different network, preconditioning or tensor shapes."""
