"""The `extras` config group: process-wide switches set before training starts (warnings, TF32, attention, ...)."""

from __future__ import annotations

import logging
import warnings

import torch
from omegaconf import DictConfig, OmegaConf

from edmlab import dist

__all__ = ["apply_extras", "quiet_lightning"]

LIGHTNING_ADVERT = "💡 Tip:"  # Lightning's message recommending its cloud logger, printed at every fit


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


def _not_an_advert(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(LIGHTNING_ADVERT)


def quiet_lightning() -> None:
    """Print each Lightning message once, in Hydra's format and into the run's log file, without its noise.

    The `lightning` package gives its logger a console handler of its own; when Hydra has configured the root
    logger, the same line then prints twice, once outside the run's log file.
    """
    import lightning

    root_handlers = logging.getLogger().handlers
    package_logger = logging.getLogger("lightning")
    own_console = getattr(lightning, "_console", None)
    if root_handlers and own_console in package_logger.handlers:
        package_logger.removeHandler(own_console)
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if _not_an_advert not in rank_zero.filters:
        rank_zero.addFilter(_not_an_advert)
    # Lightning's pytree helper calls an API torch deprecated; nothing a user of edmlab can change
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
