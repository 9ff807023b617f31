"""Loggers: Weights & Biases that never hangs (online only with an API key and a reachable server, else
offline), and a CSV logger whose metrics.csv survives a resume in the same folder."""

from __future__ import annotations

import csv
import logging
import netrc
import os
import socket
from collections.abc import Sequence
from urllib.parse import urlparse

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger as _LightningCSVLogger
from lightning.pytorch.loggers import Logger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

__all__ = ["wandb_mode", "wandb_logger", "wandb_run_id", "logs_this_step", "CSVLogger"]

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


def wandb_run_id(loggers: Sequence[Logger]) -> str | None:
    """The id of the wandb run among `loggers` (what a resume passes back as `id`), None without one."""
    from lightning.pytorch.loggers import WandbLogger

    for logger in loggers:
        if isinstance(logger, WandbLogger):
            run_id = getattr(logger.experiment, "id", None)
            return run_id if isinstance(run_id, str) else None  # ranks > 0 hold a stand-in experiment
    return None


def logs_this_step(trainer) -> bool:
    """Whether the loggers write this step's values (every `log_every_n_steps`, or a step that stops the fit).

    Lightning drops other steps' on_step values, yet each `self.log` costs ~0.5 ms of Python: on a small
    network ten of them were 4% of a step, so per-step diagnostics are logged only when they are written.
    """
    connector = getattr(trainer, "_logger_connector", None)
    return connector is None or bool(connector.should_update_logs)


def _step(row: dict) -> float:
    try:
        return float(row.get("step") or "nan")
    except ValueError:
        return float("nan")


class _HistoryKeepingWriter(ExperimentWriter):
    """Lightning's CSV writer deletes an existing metrics.csv; this one keeps it and continues it.

    At the first save, rows from the first step now logged on are dropped: a resumed run repeats the steps
    after its checkpoint, and its rows replace those the interrupted run logged for them.
    """

    def _check_log_dir_exists(self) -> None:
        self._continue = self._fs.isfile(self.metrics_file_path)
        if self._continue:
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                self.metrics_keys = sorted(csv.DictReader(f).fieldnames or [])

    def save(self) -> None:
        if self._continue and self.metrics:
            self._continue = False
            first = min(float(m["step"]) for m in self.metrics)
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                rows = [r for r in csv.DictReader(f) if not _step(r) >= first]
            with self._fs.open(self.metrics_file_path, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=self.metrics_keys)
                writer.writeheader()
                writer.writerows(rows)
        super().save()


class CSVLogger(_LightningCSVLogger):
    """Lightning's CSVLogger, except that a resumed run keeps and extends the folder's metrics.csv."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _HistoryKeepingWriter(log_dir=self.log_dir)
        return self._experiment
