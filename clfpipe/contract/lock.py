"""One writer at a time per run directory.

Training, exporting and building a repository write the run's files and its manifest. Two
processes doing so at once (``train --resume`` while the first training still ran, an export
during training) each saw a consistent run and overwrote the other's files: the run that
remained was neither's. ``run_lock`` holds an exclusive POSIX record lock on RUN/.clfpipe.lock
for the duration of the work; a second process is refused in one line naming the holder.

POSIX locks (``lockf``) rather than ``flock``: they belong to the process, so loader workers
forked while training holds the lock do not keep it once training lets go, and a nested use in
the same process (``repo`` exporting first) does not conflict with itself. The kernel drops the
lock when its process dies, so a killed run never stays locked.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import functools
import inspect
import os
from pathlib import Path
from typing import Callable, Iterator, ParamSpec, TypeVar

from clfpipe.contract.errors import ManifestError

LOCK_FILE = ".clfpipe.lock"
P = ParamSpec("P")
R = TypeVar("R")
_held: dict[Path, int] = {}  # the run directories this process holds -> their open lock file (closing it lets go)


@contextlib.contextmanager
def run_lock(run_dir: Path, what: str) -> Iterator[None]:
    """Hold RUN_DIR for `what` (e.g. "train", "export onnx") while the block runs; a ManifestError
    names the holder when another process holds it. Re-entrant within one process."""
    key = Path(run_dir).resolve()
    if key in _held:  # a nested use (repo exporting first): the outer one holds the run and lets it go
        yield
        return
    _acquire(key, what)
    try:
        yield
    finally:
        _release(key)


def holding_run(what: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """A stage's entry point whose first parameter is the run directory: it runs holding the run."""

    def wrap(fn: Callable[P, R]) -> Callable[P, R]:
        first = next(iter(inspect.signature(fn).parameters))  # the run directory, given by position or name

        @functools.wraps(fn)
        def held(*args: P.args, **kwargs: P.kwargs) -> R:
            with run_lock(Path(args[0] if args else kwargs[first]), what):  # type: ignore[arg-type]
                return fn(*args, **kwargs)

        return held

    return wrap


def _acquire(key: Path, what: str) -> None:
    if not key.is_dir():  # as RunDir.read says it, not as a lock file that cannot be made
        raise ManifestError(f"run directory not found: {key}")
    path = key / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise ManifestError(f"cannot lock the run directory {key}: {exc.strerror or exc}") from exc
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise ManifestError(f"{key} is in use by {holder}: expected one writer at a time (wait for it to end, or "
                            "stop it)") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{what} (pid {os.getpid()}, since {_dt.datetime.now().isoformat(timespec='seconds')})\n".encode(), 0)
    _held[key] = fd


def _release(key: Path) -> None:
    fd = _held.pop(key)
    os.ftruncate(fd, 0)  # the holder's line goes with the lock
    os.close(fd)  # closing drops the process's lock on the file
