"""Weights & Biases that never hangs: online only with an API key and a reachable server, else offline."""

from __future__ import annotations

import logging
import netrc
import os
import socket
from urllib.parse import urlparse

__all__ = ["wandb_mode", "wandb_logger"]

log = logging.getLogger(__name__)


def _has_api_key(host: str) -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def _reachable(host: str, port: int = 443, timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wandb_mode(requested: str | None = None) -> str:
    """The requested mode, else $WANDB_MODE, else "online" only with an API key and a reachable server."""
    mode = requested or os.environ.get("WANDB_MODE")
    if mode in ("online", "offline", "disabled", "dryrun"):
        return "offline" if mode == "dryrun" else mode
    if mode:
        raise ValueError(f"wandb mode {mode!r} is not one of online, offline, disabled")
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    if not _has_api_key(host):
        log.info("wandb: no API key (WANDB_API_KEY or ~/.netrc): logging offline; `wandb sync` uploads later")
        return "offline"
    if not _reachable(host):
        log.info(f"wandb: {host} unreachable: logging offline; `wandb sync` uploads later")
        return "offline"
    return "online"


def wandb_logger(save_dir: str, project: str = "edmlab", name: str | None = None, id: str | None = None,
                 mode: str | None = None, **kwargs):
    """A Lightning WandbLogger in the mode `wandb_mode` picks; `id` continues an earlier run (resume)."""
    from lightning.pytorch.loggers import WandbLogger

    mode = wandb_mode(mode)
    os.makedirs(save_dir, exist_ok=True)
    return WandbLogger(save_dir=save_dir, project=project, name=name, id=id, mode=mode, **kwargs)
