"""Sample-quality metrics as the papers compute them: FID (EDM's protocol), improved precision/recall.

`edmlab.metrics.precision_recall` is the module; its function is `precision_recall.precision_recall`.
"""

from edmlab.metrics.fid import (
    EDM_SEED_RANGES,
    FID_NUM,
    FeatureStats,
    FIDRun,
    Stats,
    calc,
    compute_stats,
    frechet_distance,
    load_stats,
    ref,
    save_stats,
    select_subset,
)
from edmlab.metrics.inception import InceptionV3FID, InceptionWeightsError, resolve_weights

__all__ = [
    "EDM_SEED_RANGES", "FID_NUM", "FIDRun", "FeatureStats", "InceptionV3FID", "InceptionWeightsError",
    "Stats", "calc", "compute_stats", "frechet_distance", "load_stats", "ref",
    "resolve_weights", "save_stats", "select_subset",
]
