"""The `extras` config group: process-wide switches set before training starts (warnings, TF32, attention, ...)."""

from __future__ import annotations

import warnings

import torch
from omegaconf import DictConfig, OmegaConf

from edmlab import dist

__all__ = ["apply_extras"]


def apply_extras(cfg: DictConfig) -> None:
    """Apply `cfg.extras` (configs/extras/default.yaml) to this process; rank 0 prints the composed config."""
    extras = cfg.get("extras") or {}
    if extras.get("ignore_warnings"):
        warnings.filterwarnings("ignore")
    if extras.get("allow_tf32") is not None:
        torch.backends.cuda.matmul.allow_tf32 = bool(extras.allow_tf32)
        torch.backends.cudnn.allow_tf32 = bool(extras.allow_tf32)
    if extras.get("attention"):
        from edmlab.networks.layers import set_attention

        set_attention(str(extras.attention))
    if extras.get("cudnn_benchmark") is not None:
        torch.backends.cudnn.benchmark = bool(extras.cudnn_benchmark)
    if extras.get("print_config") and dist.global_rank() == 0:
        from rich.console import Console
        from rich.syntax import Syntax

        Console(stderr=True).print(Syntax(OmegaConf.to_yaml(cfg, resolve=False), "yaml", theme="ansi_dark"))
