"""torchrun entry for the tests: clfpipe's CLI with an audit hook that lists every file this rank
opens for writing (or renames, or creates a folder at) under $CLFPIPE_TEST_WATCH; the list goes
to $CLFPIPE_TEST_WRITES/rank<RANK>.txt when the process ends, and the names of the threads still
running then (what the interpreter's exit has yet to tear down) to threads<RANK>.txt."""

import atexit
import os
import sys
from pathlib import Path

from clfpipe.cli import main

WATCH = [str(Path(p).resolve()) for p in os.environ["CLFPIPE_TEST_WATCH"].split(os.pathsep)]
seen: list[str] = []


def _inside(path) -> bool:
    try:
        text = os.fsdecode(path)
    except TypeError:
        return False
    return any(os.path.abspath(text).startswith(root) for root in WATCH)


def _hook(event: str, args: tuple) -> None:
    if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
        mode, flags = args[1], args[2] if len(args) > 2 else 0
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
        if writing and _inside(args[0]):
            seen.append(f"open {os.fsdecode(args[0])}")
    elif event in ("os.rename", "os.replace", "os.mkdir", "os.remove", "os.unlink") and args and _inside(args[0]):
        seen.append(f"{event} {os.fsdecode(args[0])}")


def _threads() -> list[str]:
    names = []
    for task in Path("/proc/self/task").iterdir():
        try:
            names.append((task / "comm").read_text().strip())
        except OSError:  # the thread ended meanwhile
            pass
    return names


def _dump() -> None:
    out, rank = Path(os.environ["CLFPIPE_TEST_WRITES"]), os.environ.get("RANK", "0")
    (out / f"rank{rank}.txt").write_text("\n".join(seen) + "\n")
    (out / f"threads{rank}.txt").write_text("\n".join(_threads()) + "\n")


if __name__ == "__main__":  # not again in a process that spawn starts from this one (the input process)
    sys.addaudithook(_hook)
    atexit.register(_dump)
    sys.exit(main(sys.argv[1:]))
