"""Progress of steps that take more than a few seconds: a tqdm bar on a terminal; when stderr is a
file or a pipe, a log line every tenth of the way (or every 15 s) once a step has run 5 s, so logs
show long steps without filling up with short ones."""

from __future__ import annotations

import logging
import sys
import time
from typing import Iterable, Iterator, TypeVar

from tqdm import tqdm

T = TypeVar("T")
log = logging.getLogger("clfpipe.progress")


def _on_terminal() -> bool:
    return hasattr(sys.stderr, "isatty") and sys.stderr.isatty()


def progress(items: Iterable[T], what: str, *, total: int | None = None, unit: str = "it",
             every_s: float = 15.0, after_s: float = 5.0) -> Iterator[T]:
    """Yield items while reporting ``what``: n/total done."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    if _on_terminal():
        yield from tqdm(items, desc=what, total=total, unit=unit, leave=False, dynamic_ncols=True)
        return
    start = last = time.monotonic()
    step = max(1, (total or 0) // 10)
    done = 0
    for item in items:
        yield item
        done += 1
        now = time.monotonic()
        tenth = bool(total) and done % step == 0 and done < (total or 0)
        if now - start >= after_s and (tenth or now - last >= every_s):
            shown = f"{done}/{total} {unit}" if total else f"{done} {unit}"
            log.info("%s: %s (%.1fs)", what, shown, now - start)
            last = now
