"""Progress of long loops over images (sampling, Inception features, image checks, likelihoods).

A rich bar (img/s, ETA) on a terminal; elsewhere (cluster log files) a log line every 30 s and one at the end.
The module is named for where the output goes, not `progress`, so that it is never confused with
`edmlab.training.progress` (the Lightning callback that counts training kimg). It imports neither Lightning
nor any other edmlab package, so data/, metrics/ and generation/ can all use it.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

__all__ = ["progress", "LOG_EVERY_SECONDS"]

log = logging.getLogger(__name__)

LOG_EVERY_SECONDS = 30.0


@contextmanager
def progress(label: str, total: int, *, enabled: bool = True,
             transient: bool = False) -> Iterator[Callable[[int], None]]:
    """Show the progress of `total` images under `label`; yields advance(n), to call after every n images.

    transient=True removes the bar when the loop ends (terminal only).
    """
    start = last = time.perf_counter()
    done = 0
    if enabled and total and sys.stderr.isatty():
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        columns = [TextColumn(label), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[rate]} img/s"), TextColumn("ETA"), TimeRemainingColumn()]
        with Progress(*columns, transient=transient) as bar:
            task = bar.add_task(label, total=total, rate="?")

            def advance(n: int) -> None:
                nonlocal done
                done += n
                bar.update(task, advance=n, rate=f"{done / max(time.perf_counter() - start, 1e-9):.1f}")

            yield advance
    else:
        def advance(n: int) -> None:
            nonlocal done, last
            done += n
            now = time.perf_counter()
            if enabled and (now - last >= LOG_EVERY_SECONDS or done == total):
                rate = done / max(now - start, 1e-9)
                eta = (total - done) / rate if rate > 0 else math.inf
                log.info(f"{label}: {done}/{total} images, {rate:.1f} img/s, ETA {eta:.0f} s")
                last = now

        yield advance
