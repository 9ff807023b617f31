"""One run per run folder: an exclusive lock held for the whole run, released by the kernel when it ends.

`flock` on `<run folder>/.edmlab.lock` cannot go stale (a killed run drops it), so a requeued or restarted
job takes its folder back while a second run started on a folder in use refuses, naming the first.
"""

from __future__ import annotations

import datetime
import fcntl
import logging
import os
import socket
import sys
from pathlib import Path
from typing import IO

__all__ = ["LOCK_NAME", "RunDirInUse", "lock_run_dir", "unlock_run_dir"]

log = logging.getLogger(__name__)

LOCK_NAME = ".edmlab.lock"
_held: dict[str, IO[str]] = {}


class RunDirInUse(RuntimeError):
    """Another process holds this run folder."""


def lock_run_dir(path: str | os.PathLike) -> None:
    """Take the folder's lock for this process (idempotent); raise RunDirInUse naming the holder."""
    folder = Path(path).resolve()
    if str(folder) in _held:
        return
    folder.mkdir(parents=True, exist_ok=True)
    # the lock file is rewritten in place on purpose: the lock lives on its open file, not on its name
    f = open(folder / LOCK_NAME, "a+")  # noqa: SIM115 - held open for the whole run
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise RunDirInUse(f"{folder} is in use by {holder}; wait for that run to end or use another folder "
                          "(hydra.run.dir=... / paths.output_dir=...)") from None
    except OSError as e:  # a file system without flock: run unprotected rather than not at all
        f.close()
        log.warning(f"{folder}: cannot lock the run folder ({e}); make sure no other run uses it")
        return
    f.seek(0)
    f.truncate()
    started = datetime.datetime.now().isoformat(timespec="seconds")
    f.write(f"pid {os.getpid()} on {socket.gethostname()} since {started} ({' '.join(sys.argv)[:300]})\n")
    f.flush()
    _held[str(folder)] = f


def unlock_run_dir(path: str | os.PathLike) -> None:
    f = _held.pop(str(Path(path).resolve()), None)
    if f is not None:
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)
        f.close()
