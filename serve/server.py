"""The embedded Triton server: the real ``tritonserver`` from the nvidia-pytriton wheel.

The wheel ships the binary (``pytriton/tritonserver/bin``), its shared libraries
(``nvidia_pytriton.libs``) and the python backend with one stub per Python version
(``pytriton/tritonserver/python_backend_stubs/3.X``). ``start_server`` assembles a backend directory with the
stub matching this interpreter, starts the server in its own process group with a pid file and
a log, and returns once it is ready; ``stop_server`` ends the group (server and stubs).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from clfpipe.contract.errors import ServeError

PID_FILE = "server.json"
LOG_FILE = "server.log"


@dataclass(frozen=True)
class Ports:
    http: int = 8000
    grpc: int = 8001
    metrics: int = 8002


@dataclass(frozen=True)
class ServerInfo:
    pid: int
    host: str
    ports: Ports
    repo: str
    log: str
    started: float

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.ports.http}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.ports.grpc}"

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "ServerInfo":
        data = json.loads(text)
        return cls(**{**data, "ports": Ports(**data["ports"])})


@dataclass(frozen=True)
class TritonInstall:
    binary: Path
    libs: Path
    python_backend: Path
    stub: Path


def default_state_dir() -> Path:
    return Path(os.environ.get("CLFPIPE_STATE_DIR", "~/.cache/clfpipe")).expanduser() / "server"


def find_triton() -> TritonInstall:
    """Locate tritonserver, its libraries and the python-backend stub for this Python."""
    # find_spec, not import: importing pytriton pulls in its whole client (gevent, zmq, ...)
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise ServeError("nvidia-pytriton is not installed: expected it to provide tritonserver (pip install nvidia-pytriton)")
    root = Path(list(spec.submodule_search_locations)[0]) / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    install = TritonInstall(
        binary=root / "bin" / "tritonserver",
        libs=root.parent.parent / "nvidia_pytriton.libs",
        python_backend=root / "backends" / "python",
        stub=root / "python_backend_stubs" / version / "triton_python_backend_stub",
    )
    for path in (install.binary, install.libs, install.python_backend, install.stub):
        if not path.exists():
            raise ServeError(f"incomplete nvidia-pytriton install: expected {path}")
    return install


def prepare_backends(install: TritonInstall, state_dir: Path) -> Path:
    """backends/python/ = libtriton_python.so + utils + the stub matching this interpreter."""
    backends = state_dir / "backends"
    target = backends / "python"
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(install.python_backend, target, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(install.stub, target / "triton_python_backend_stub")
    return backends


def server_env(install: TritonInstall) -> dict[str, str]:
    """The stub finds this environment's packages through ``python3`` on PATH (its venv's
    pyvenv.cfg), so this interpreter's bin goes first; its libpython goes first on the library path."""
    env = os.environ.copy()
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    libs = [sysconfig.get_config_var("LIBDIR") or "", str(install.libs), env.get("LD_LIBRARY_PATH", "")]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in libs if p)
    return env


CONTROL_MODES = ("none", "explicit", "poll")


def server_args(install: TritonInstall, repo: Path, backends: Path, *, host: str, ports: Ports,
                model_control: str = "none") -> list[str]:
    args = [
        str(install.binary),
        f"--model-repository={repo}",
        f"--backend-directory={backends}",
        # none: what the repository holds is what runs; no remote load/unload unless asked
        f"--model-control-mode={model_control}",
        "--disable-auto-complete-config",
        f"--http-address={host}", f"--http-port={ports.http}",
        f"--grpc-address={host}", f"--grpc-port={ports.grpc}",
        f"--metrics-address={host}", f"--metrics-port={ports.metrics}",
        "--allow-metrics=true",
        # Idle keep-alive client connections otherwise hold a SIGTERM for the default 30 s.
        "--exit-timeout-secs=5",
        # Unique shared-memory names so several servers can run side by side (tests, demo).
        f"--backend-config=python,shm-region-prefix-name=clfpipe_{ports.http}_",
        "--backend-config=python,shm-default-byte-size=16777216",
        "--backend-config=python,shm-growth-byte-size=16777216",
    ]
    if model_control == "explicit":
        args.append("--load-model=*")  # start with every model, as "none" does
    return args


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is dead for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def server_alive(info: ServerInfo) -> bool:
    """Whether the process the pid file names still runs."""
    return _alive(info.pid)


def is_ready(host: str, http_port: int, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"http://{host}:{http_port}/v2/health/ready", timeout=timeout) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _log_errors(log: Path, lines: int = 2) -> str:
    """The lines that say why: model load failures first; GPU-less noise (NVML, DCGM) skipped."""
    text = log.read_text(errors="replace").splitlines() if log.exists() else []
    noise = ("NVML", "DCGM")
    errors = [l for l in text if (l.startswith("E") or "error" in l.lower()) and not any(n in l for n in noise)]
    loads = [l.split("] ", 1)[-1].split("\\n")[0] for l in errors if "failed to load" in l]
    return " | ".join(loads[:lines] or errors[-lines:] or text[-lines:])


def read_info(state_dir: Path | None = None) -> ServerInfo | None:
    path = (state_dir or default_state_dir()) / PID_FILE
    if not path.exists():
        return None
    try:
        return ServerInfo.from_json(path.read_text())
    except (json.JSONDecodeError, TypeError, KeyError):
        path.unlink()  # a torn pid file names no server
        return None


def start_server(repo: Path, state_dir: Path | None = None, *, host: str = "127.0.0.1", ports: Ports = Ports(),
                 timeout: float = 180.0, model_control: str = "none") -> ServerInfo:
    """Start tritonserver on REPO and return once it reports ready."""
    if model_control not in CONTROL_MODES:
        raise ServeError(f"--model-control: expected one of {', '.join(CONTROL_MODES)}, got {model_control!r}")
    state_dir = state_dir or default_state_dir()
    repo = Path(repo).resolve()
    if not repo.is_dir() or not any(repo.glob("*/config.pbtxt")):
        raise ServeError(f"expected a model repository with <model>/config.pbtxt, got {repo}")
    running = read_info(state_dir)
    if running and _alive(running.pid):
        raise ServeError(f"a server is already running (pid {running.pid}, http {running.http_url}): run 'clfpipe serve down' first")
    for name, port in asdict(ports).items():
        if not _port_free(host, port):
            raise ServeError(f"{name} port {port} on {host} is in use: expected a free port (pass --{name}-port)")
    install = find_triton()
    state_dir.mkdir(parents=True, exist_ok=True)
    backends = prepare_backends(install, state_dir)
    log = state_dir / LOG_FILE
    with open(log, "wb") as out:
        proc = subprocess.Popen(server_args(install, repo, backends, host=host, ports=ports, model_control=model_control), stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=server_env(install), start_new_session=True)
    info = ServerInfo(proc.pid, host, ports, str(repo), str(log), time.time())
    (state_dir / PID_FILE).write_text(info.to_json())
    deadline = time.monotonic() + timeout
    while not is_ready(host, ports.http):
        if proc.poll() is not None:
            (state_dir / PID_FILE).unlink(missing_ok=True)
            raise ServeError(f"tritonserver exited with code {proc.returncode}: {_log_errors(log)} (log: {log})")
        if time.monotonic() > deadline:
            stop_server(state_dir)
            raise ServeError(f"tritonserver not ready after {timeout:.0f}s: {_log_errors(log)} (log: {log})")
        time.sleep(0.25)
    return info


def _signal_group(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def stop_server(state_dir: Path | None = None, timeout: float = 30.0) -> ServerInfo | None:
    """SIGTERM the server's process group (server and python stubs), SIGKILL what outlives timeout."""
    state_dir = state_dir or default_state_dir()
    info = read_info(state_dir)
    if info is None:
        return None
    _signal_group(info.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _group_alive(info.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if _group_alive(info.pid):
        _signal_group(info.pid, signal.SIGKILL)
    (state_dir / PID_FILE).unlink(missing_ok=True)
    return info


def server_status(state_dir: Path | None = None) -> tuple[ServerInfo | None, str]:
    """(info, one of 'ready', 'starting or unhealthy', 'not running')."""
    info = read_info(state_dir or default_state_dir())
    if info is None or not _alive(info.pid):
        return info, "not running"
    return info, "ready" if is_ready(info.host, info.ports.http) else "starting or unhealthy"
