"""Progress of long loops over images: a rich bar (img/s, ETA) on a terminal, else a log line every 30 s."""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

__all__ = ["progress"]

log = logging.getLogger(__name__)


@contextmanager
def progress(total: int, enabled: bool, label: str) -> Iterator[Callable[[int], None]]:
    """A rich bar (img/s, ETA) on a terminal, else a status line every 30 s; yields advance(n)."""
    start = last = time.perf_counter()
    done = 0
    if enabled and total and sys.stderr.isatty():
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        columns = [TextColumn(label), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[rate]} img/s"), TextColumn("ETA"), TimeRemainingColumn()]
        with Progress(*columns, transient=False) as bar:
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
            if enabled and (now - last >= 30 or done == total):
                rate = done / max(now - start, 1e-9)
                eta = (total - done) / rate if rate > 0 else math.inf
                log.info(f"{label} {done}/{total} images, {rate:.1f} img/s, ETA {eta:.0f} s")
                last = now

        yield advance
