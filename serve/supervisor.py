"""The supervisor ``serve up`` starts beside tritonserver: it sends a real request through every
ensemble every second and, after two failures in a row (or when the server process is gone),
restarts tritonserver on the same repository, host and ports, logging why. An answer that names a
dead stub triggers the restart at the first probe.

Triton 2.51's python backend does not restart a stub that died, and its health endpoints keep
saying ready (triton-inference-server/server#8604): without this, one killed stub is a permanent
outage. Restarts back off (2, 5, 15, 30 s) while they keep failing.

    python -m clfpipe.serve.supervisor STATE_DIR [--interval 1] [--failures 2]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from clfpipe.contract.errors import ServeError
from clfpipe.serve.probe import ensembles, probe
from clfpipe.serve.server import (
    SUPERVISOR_LOG,
    Process,
    ServerInfo,
    is_our_server,
    launch,
    read_info,
    remove_shm,
    stop_group,
    write_info,
)

log = logging.getLogger("clfpipe.serve.supervisor")
BACKOFF_S = (2, 5, 15, 30)
DEAD_STUB = "is not healthy"  # how Triton's python backend answers for a stub that died
MODULE = "clfpipe.serve.supervisor"


def start_supervisor(state_dir: Path, info: ServerInfo, interval: float = 1.0, failures: int = 2) -> ServerInfo:
    """Start the supervisor process for the server `info` describes; record it in the pid file."""
    with open(state_dir / SUPERVISOR_LOG, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", MODULE, str(state_dir), "--interval", str(interval),
                                 "--failures", str(failures)],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    process = Process.of(proc.pid)
    info = replace(info, supervisor={"pid": proc.pid, "process_started": process.started if process else 0})
    write_info(state_dir, info)
    return info


def _is_supervisor(process: Process) -> bool:
    try:
        return process.alive() and MODULE in Path(f"/proc/{process.pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False


def stop_supervisor(state_dir: Path, info: ServerInfo, timeout: float = 30.0) -> None:
    """SIGTERM the recorded supervisor (only if it is still that process), and wait for it."""
    if not info.supervisor:
        return
    process = Process(info.supervisor["pid"], info.supervisor["process_started"])
    if not _is_supervisor(process):
        return
    os.kill(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while process.alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    if process.alive():
        os.kill(process.pid, signal.SIGKILL)


def restart(state_dir: Path, info: ServerInfo, reason: str, timeout: float = 300.0) -> ServerInfo:
    """Stop the broken server's process group and start it again, recording why."""
    log.warning("restarting tritonserver (pid %d): %s", info.pid, reason)
    stop_group(info.process, timeout=0)  # it is broken: SIGKILL, no graceful exit to wait for
    remove_shm(info.ports)
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    info = replace(info, restarts=[*info.restarts, {"time": now, "reason": reason}][-20:])
    info = launch(state_dir, info, timeout)
    log.warning("tritonserver serving again (pid %d)", info.pid)
    return info


def _ensembles(info: ServerInfo) -> dict[str, tuple[str, bool]] | None:
    try:
        return ensembles(info.http_url, 5.0)
    except (OSError, RuntimeError, ValueError, KeyError):
        return None  # probe() lists them itself then


class _Stop(Exception):
    pass


def _on_term(signum: int, frame: object) -> None:
    raise _Stop()


def supervise(state_dir: Path, interval: float = 1.0, failures: int = 2) -> None:
    """Probe, and restart after `failures` failed probes in a row, until SIGTERM or the pid file goes."""
    signal.signal(signal.SIGTERM, _on_term)
    failed, attempts, served, served_pid = 0, 0, None, None
    try:
        while True:
            time.sleep(interval)
            info = read_info(state_dir)
            if info is None:
                return  # stopped by 'clfpipe serve down'
            if not is_our_server(info):
                reason = f"tritonserver (pid {info.pid}) is gone"
            else:
                if served_pid != info.pid:  # list the ensembles once per server process
                    served, served_pid = _ensembles(info), info.pid
                started = time.monotonic()
                result = probe(info.http_url, timeout=5.0, served=served)
                log.debug("probe %s in %.2fs", "ok" if result.ok else result.summary(), time.monotonic() - started)
                failed = 0 if result.ok else failed + 1
                # a dead stub is certain at once; a slow answer under load gets a second chance
                if failed < failures and not (failed and DEAD_STUB in result.summary()):
                    attempts = 0 if result.ok else attempts
                    continue
                reason = result.summary()
            try:
                restart(state_dir, info, reason)
                failed, attempts = 0, 0
            except ServeError as exc:
                wait = BACKOFF_S[min(attempts, len(BACKOFF_S) - 1)]
                attempts += 1
                log.error("restart failed (%s); next try in %ds", exc, wait)
                time.sleep(wait)
    except _Stop:
        return


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="keep a clfpipe tritonserver answering real requests")
    parser.add_argument("state_dir", type=Path, help="the server's state folder (pid file and log)")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between probes")
    parser.add_argument("--failures", type=int, default=2, help="failed probes in a row before a restart")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if os.environ.get("CLFPIPE_SUPERVISOR_DEBUG") else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s")
    supervise(args.state_dir, args.interval, args.failures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
