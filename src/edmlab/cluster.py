"""Clusters: Slurm job ids, requeue on the time-limit signal, Lightning's cluster environment.

Slurm sends `--signal=USR1@<s>` seconds before a job's time limit. `edmlab.training.Checkpoint`
saves `last.ckpt` at the next step boundary (all ranks agree) and stops; `Requeue` then runs
`scontrol requeue <job>` from global rank 0 and every rank exits with `EXIT_REQUEUED`. The requeued
job keeps its job id, so it gets its run folder back (`edmlab.run_stamp`; under the submitit
launcher the pickled sweep config holds the folder) and resumes from the checkpoint in it.
`$EDMLAB_REQUEUE_CMD` replaces `scontrol requeue` (tests, other schedulers); the job id is appended.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal as signal_module
import subprocess
from collections.abc import Mapping
from typing import Any

from lightning.pytorch.callbacks import Callback

from edmlab.dist import launch_info

__all__ = ["EXIT_REQUEUED", "REQUEUE_CMD_ENV", "Requeue", "slurm_job_id", "requeue_command", "requeue",
           "cluster_environment"]

log = logging.getLogger(__name__)

EXIT_REQUEUED = 75                       # sysexits.h EX_TEMPFAIL: not finished, the requeued job continues it
REQUEUE_CMD_ENV = "EDMLAB_REQUEUE_CMD"   # replaces `scontrol requeue`; the job id is appended


def _env(environ: Mapping[str, str] | None) -> Mapping[str, str]:
    return os.environ if environ is None else environ


def slurm_job_id(environ: Mapping[str, str] | None = None) -> str | None:
    """The id `scontrol requeue` takes: `<array job>_<task>` for an array task, else $SLURM_JOB_ID (None: no Slurm)."""
    env = _env(environ)
    array_job, task = env.get("SLURM_ARRAY_JOB_ID"), env.get("SLURM_ARRAY_TASK_ID")
    if array_job and task:
        return f"{array_job}_{task}"
    return env.get("SLURM_JOB_ID") or None


def cluster_environment(environ: Mapping[str, str] | None = None):
    """The Lightning cluster environment to pass as `Trainer(plugins=[...])`, or None to let Lightning detect it.

    Under torchrun inside a Slurm allocation Lightning would pick SLURMEnvironment (one task per node) and get
    the ranks wrong; under srun, Lightning's own auto-requeue (a non-atomic hpc_ckpt) is turned off because
    `edmlab.training.Checkpoint` + `Requeue` handle the signal.
    """
    from lightning.pytorch.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    launcher = launch_info(environ).launcher
    if launcher == "torchrun":
        return TorchElasticEnvironment()
    if launcher == "slurm":
        return SLURMEnvironment(auto_requeue=False, requeue_signal=signal_module.SIGUSR1)
    return None


def requeue_command(job_id: str, environ: Mapping[str, str] | None = None) -> list[str]:
    """`scontrol requeue <job_id>`, or `$EDMLAB_REQUEUE_CMD <job_id>` when that is set."""
    custom = _env(environ).get(REQUEUE_CMD_ENV)
    return [*shlex.split(custom), job_id] if custom else ["scontrol", "requeue", job_id]


def requeue(job_id: str | None = None, environ: Mapping[str, str] | None = None, timeout_s: float = 60.0) -> bool:
    """Put this Slurm job back in the queue (same job id, same run folder); True when the command succeeded."""
    job_id = job_id or slurm_job_id(environ)
    if not job_id:
        log.error("requeue: not inside a Slurm job ($SLURM_JOB_ID unset); resubmit with ckpt_path=<run folder>")
        return False
    cmd = requeue_command(job_id, environ)
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        log.error(f"requeue: `{shlex.join(cmd)}` failed ({type(e).__name__}: {e}); resubmit with ckpt_path=last")
        return False
    if done.returncode != 0:
        reason = done.stderr.strip() or done.stdout.strip()
        log.error(f"requeue: `{shlex.join(cmd)}` exited {done.returncode}: {reason}")
        return False
    log.warning(f"requeued Slurm job {job_id}: it resumes from its run folder's last.ckpt")
    return True


class Requeue(Callback):
    """After `callbacks.checkpoint` saved on the time-limit signal: requeue the Slurm job, exit EXIT_REQUEUED.

    Inert outside Slurm unless $EDMLAB_REQUEUE_CMD is set. When active it makes the checkpoint callback save
    AND stop on `signal` (saving and training on would only lose the save to the coming SIGKILL).
    """

    def __init__(self,
                 signal: str = "SIGUSR1",     # what `#SBATCH --signal=USR1@120` sends before the time limit
                 exit: bool = True,           # raise SystemExit(EXIT_REQUEUED) after requeueing (no final eval)
                 ) -> None:
        try:
            self.signum = int(getattr(signal_module, signal))
        except AttributeError as e:
            raise ValueError(f"callbacks.requeue.signal={signal!r} is not a signal name; use e.g. SIGUSR1") from e
        self.signal = signal_module.Signals(self.signum).name
        self.exit = exit
        self.requeued: bool | None = None    # None: not asked to; else whether the requeue command succeeded
        self._checkpoint: Any = None

    @staticmethod
    def active(environ: Mapping[str, str] | None = None) -> bool:
        env = _env(environ)
        return slurm_job_id(env) is not None or bool(env.get(REQUEUE_CMD_ENV))

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit" or not self.active():
            return
        from edmlab.training.checkpoint import Checkpoint

        found = [c for c in trainer.callbacks if isinstance(c, Checkpoint)]
        if not found:
            raise ValueError("callbacks.requeue needs callbacks.checkpoint (edmlab.training.Checkpoint) to save "
                             "last.ckpt before the job is requeued; add it or drop callbacks.requeue")
        self._checkpoint = found[0]
        for signals in (self._checkpoint.save_on_signals, self._checkpoint.stop_on_signals):
            if self.signum not in signals:
                signals.append(self.signum)
        environment = getattr(trainer.strategy, "cluster_environment", None)
        if environment is None:  # single-device strategies keep it on the connector only
            environment = getattr(getattr(trainer, "_accelerator_connector", None), "cluster_environment", None)
        if hasattr(environment, "auto_requeue"):
            environment.auto_requeue = False  # Lightning's handler would write a second, non-atomic checkpoint

    def on_train_end(self, trainer, pl_module) -> None:
        if self._checkpoint is None or self._checkpoint.stopped_by_signal != self.signal:
            return
        self.requeued = requeue() if trainer.is_global_zero else True
        if self.exit:
            # SystemExit passes Hydra's and submitit's `except Exception`: no result is recorded for this
            # attempt, so a sweep waits for the requeued job instead of taking a half-trained metric
            raise SystemExit(EXIT_REQUEUED if self.requeued else 1)
