"""The embedded Triton server: the real ``tritonserver`` from the nvidia-pytriton wheel.

The wheel ships the binary (``pytriton/tritonserver/bin``), its shared libraries
(``nvidia_pytriton.libs``) and the python backend with one stub per Python version
(``pytriton/tritonserver/python_backend_stubs/3.X``). ``start_server`` assembles a backend
directory with the stub matching this interpreter, checks the repository against the hashes
``clfpipe repo`` recorded, starts the server in its own process group and returns once a real
request works; a supervisor process (``clfpipe.serve.supervisor``) then keeps probing and restarts
the server when a request stops working. The pid file records the process's identity (binary and
start time), so nothing is ever signalled on the word of a stale pid.
"""

from __future__ import annotations

import errno
import hashlib
import importlib.util
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from clfpipe.contract.errors import ServeError, first_line
from clfpipe.contract.integrity import recorded_hashes
from clfpipe.serve.probe import probe
from clfpipe.serve.repository import verify_repository

PID_FILE = "server.json"
LOG_FILE = "server.log"
SUPERVISOR_LOG = "supervisor.log"
CONTROL_MODES = ("none", "explicit", "poll")
SHM = Path("/dev/shm")
# What the python-backend stub can take on its command line: it splits its arguments on spaces
# and fails on non-ASCII ones (std::invalid_argument: stol).
SAFE_PATH = re.compile(r"^[A-Za-z0-9._/+-]+$")


@dataclass(frozen=True)
class Ports:
    http: int = 8000
    grpc: int = 8001
    metrics: int = 8002

    def __post_init__(self) -> None:
        seen: dict[int, str] = {}
        for name, port in asdict(self).items():
            if not 1 <= port <= 65535:
                raise ServeError(f"--{name}-port: expected a port in 1..65535, got {port}")
            if port in seen:  # tritonserver then exits printing its usage text
                raise ServeError(f"--{name}-port: expected a port other than --{seen[port]}-port's, got {port} for both")
            seen[port] = name

    @classmethod
    def free(cls) -> "Ports":
        """Three ports free on loopback now (for tests and benchmarks that run servers side by side)."""
        return cls(free_port(), free_port(), free_port())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class Process:
    """A process as the kernel knows it: pid and start time (clock ticks after boot)."""

    pid: int
    started: int

    @classmethod
    def of(cls, pid: int) -> "Process | None":
        stat = _stat(pid)
        return None if stat is None else cls(pid, int(stat[19]))

    def alive(self) -> bool:
        """Still the same process (a reused pid has another start time), and not a zombie."""
        stat = _stat(self.pid)
        return stat is not None and int(stat[19]) == self.started and stat[0] != "Z"


def _stat(pid: int) -> list[str] | None:
    """/proc/<pid>/stat fields after the command name (state first), or None."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


@dataclass(frozen=True)
class ServerInfo:
    pid: int
    host: str
    ports: Ports
    repo: str
    log: str
    started: float
    process_started: int = 0  # the kernel's start time of pid: identity, not just a number
    served_repo: str = ""  # the path tritonserver was given (a link without spaces, where needed)
    model_control: str = "none"
    supervisor: dict | None = None  # {"pid", "process_started"} of the supervisor, when one runs
    restarts: list = field(default_factory=list)  # [{"time", "reason"}] by the supervisor

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.ports.http}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.ports.grpc}"

    @property
    def process(self) -> Process:
        return Process(self.pid, self.process_started)

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


def safe_path(path: Path) -> Path:
    """`path`, or a link to it under the temp folder when the stub could not take it (spaces,
    non-ASCII): the link's name is a hash of the path, so the same path gets the same link."""
    path = path.resolve()
    if SAFE_PATH.match(str(path)):
        return path
    root = Path(tempfile.gettempdir()) / f"clfpipe-{os.getuid()}"
    if not SAFE_PATH.match(str(root)):
        raise ServeError(f"{path}: the Triton stub cannot take a path with spaces or non-ASCII characters, and the temp "
                         f"folder {root} has them too: move it or set TMPDIR")
    root.mkdir(mode=0o700, exist_ok=True)
    link = root / hashlib.sha256(str(path).encode()).hexdigest()[:16]
    if link.is_symlink() and Path(os.readlink(link)) != path:
        link.unlink()
    if not link.is_symlink():
        link.symlink_to(path, target_is_directory=True)
    return link


def prepare_backends(install: TritonInstall, state_dir: Path) -> Path:
    """backends/python/ = libtriton_python.so + utils + the stub matching this interpreter."""
    backends = state_dir / "backends"
    target = backends / "python"
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(install.python_backend, target, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(install.stub, target / "triton_python_backend_stub")
    return safe_path(backends)


def server_env(install: TritonInstall) -> dict[str, str]:
    """The stub finds this environment's packages through ``python3`` on PATH (its venv's
    pyvenv.cfg), so this interpreter's bin goes first; its libpython goes first on the library path."""
    env = os.environ.copy()
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    libs = [sysconfig.get_config_var("LIBDIR") or "", str(install.libs), env.get("LD_LIBRARY_PATH", "")]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in libs if p)
    return env


def check_stub_numpy(env: dict[str, str]) -> str:
    """The numpy of the python3 the stub embeds (the first on the server's PATH), refused when >= 2:
    Triton 2.51's python backend then misreads every tensor without an error."""
    python = shutil.which("python3", path=env["PATH"]) or sys.executable
    result = subprocess.run([python, "-c", "import numpy; print(numpy.__version__)"], capture_output=True, text=True,
                            env=env, timeout=60)
    version = result.stdout.strip()
    if result.returncode != 0 or not version:
        raise ServeError(f"the python the Triton stub embeds ({python}) cannot import numpy: install numpy<2 there")
    if int(version.split(".")[0]) >= 2:
        raise ServeError(f"the python the Triton stub embeds ({python}) has numpy {version}: Triton 2.51's python backend "
                         f"corrupts every tensor with numpy 2; install 'numpy<2' there (pip install 'numpy<2')")
    return version


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
        f"--backend-config=python,shm-region-prefix-name={shm_prefix(ports)}",
        "--backend-config=python,shm-default-byte-size=16777216",
        "--backend-config=python,shm-growth-byte-size=16777216",
    ]
    if model_control == "explicit":
        args.append("--load-model=*")  # start with every model, as "none" does
    return args


def shm_prefix(ports: Ports) -> str:
    return f"clfpipe_{ports.http}_"


def remove_shm(ports: Ports) -> list[Path]:
    """The python backend's shared-memory regions a dead server on these ports left behind."""
    removed = []
    for region in SHM.glob(f"{shm_prefix(ports)}*") if SHM.is_dir() else []:
        region.unlink(missing_ok=True)
        removed.append(region)
    return removed


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except (OSError, ValueError):
        return False


def check_model_control(model_control: str, host: str, allow_remote: bool) -> None:
    """explicit/poll let a client load a model whose model.py then runs as the server's user: only
    on loopback, unless asked for in so many words."""
    if model_control not in CONTROL_MODES:
        raise ServeError(f"--model-control: expected one of {', '.join(CONTROL_MODES)}, got {model_control!r}")
    if model_control != "none" and not _loopback(host) and not allow_remote:
        raise ServeError(f"--model-control {model_control} on {host}: any client that reaches it could load a model whose "
                         "code runs as this user; bind 127.0.0.1, or pass --allow-remote-model-control")


def _bind_error(host: str, port: int) -> OSError | ValueError | None:
    """Why a listening socket on (host, port) cannot be made now, or None. ValueError: a name that
    cannot even be looked up (a NUL in it, a label over 63 characters)."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
    except (OSError, ValueError) as exc:  # gaierror is an OSError; UnicodeError a ValueError
        return exc
    return None


def _why(error: OSError | ValueError) -> str:
    """What the system said of a socket error (its strerror), else the error's first line."""
    return getattr(error, "strerror", None) or first_line(error)


def check_host(host: str) -> None:
    """--host: an address (or name) of this machine that a server can listen on, or 0.0.0.0 / ::
    for every interface (bound once on a port the kernel picks)."""
    error = _bind_error(host, 0) if host.strip() else ValueError("empty")
    if error is not None:
        raise ServeError(f"--host: expected an address of this machine (0.0.0.0: every interface), got {host!r} ({_why(error)})")


def check_port_free(host: str, name: str, port: int) -> None:
    """One endpoint's port on --host can be listened on now (after check_host)."""
    error = _bind_error(host, port)
    if error is None:
        return
    if getattr(error, "errno", None) == errno.EADDRINUSE:
        raise ServeError(f"{name} port {port} on {host} is in use: expected a free port (pass --{name}-port)")
    if getattr(error, "errno", None) == errno.EACCES:
        raise ServeError(f"--{name}-port {port}: this user may not listen below 1024: expected a port of 1024 or more")
    raise ServeError(f"cannot listen on {host} port {port} for {name}: {_why(error)}")


MAX_TIMEOUT_S = 86_400.0  # a day: a TensorRT build on a slow GPU takes minutes, not days


def check_start(host: str, timeout: float, model_control: str, allow_remote_model_control: bool) -> None:
    """What 'serve up' is told, checked before anything is made or started (a repository for --run
    included): the host, the model control it allows, the timeout. Whether the ports are free is
    checked later, once a server of ours that holds them is known not to run."""
    check_host(host)
    check_model_control(model_control, host, allow_remote_model_control)
    if not 0 < timeout <= MAX_TIMEOUT_S:  # nan fails this too
        raise ServeError(f"--timeout: expected seconds in (0, {MAX_TIMEOUT_S}], got {timeout}")


def is_our_server(info: ServerInfo) -> bool:
    """The pid file's process still runs and is the tritonserver this state started (same start
    time, same binary): a reused pid is never taken for it."""
    if not info.process.alive():
        return False
    try:
        argv0 = Path(f"/proc/{info.pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
    except OSError:
        return False
    return Path(argv0).name == "tritonserver"


def stub_pid(server_pid: int, model: str) -> int | None:
    """The python-backend stub the server `server_pid` started for `model` (several servers may
    serve the same repository folder: the parent tells them apart)."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
            ppid = int((cmdline.parent / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == server_pid and len(args) > 1 and args[1].endswith(f"/{model}/1/model.py".encode()):
            return int(cmdline.parent.name)
    return None


def is_ready(host: str, http_port: int, timeout: float = 2.0) -> bool:
    """Triton's own readiness (every model loaded); a dead python stub does not change it: see probe()."""
    try:
        with urllib.request.urlopen(f"http://{host}:{http_port}/v2/health/ready", timeout=timeout) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _log_errors(log: Path, lines: int = 2) -> str:
    """The lines that say why: model load failures first; GPU-less noise (NVML, DCGM, CUDA) skipped."""
    text = log.read_text(errors="replace").splitlines() if log.exists() else []
    noise = ("NVML", "DCGM", "CudaDriverHelper", "CUDA driver")
    errors = [line for line in text if (line.startswith("E") or "error" in line.lower()) and not any(n in line for n in noise)]
    loads = [line.split("] ", 1)[-1].split("\\n")[0] for line in errors if "failed to load" in line]
    return " | ".join(loads[:lines] or errors[-lines:] or text[-lines:])


def read_info(state_dir: Path | None = None) -> ServerInfo | None:
    path = (state_dir or default_state_dir()) / PID_FILE
    if not path.exists():
        return None
    try:
        return ServerInfo.from_json(path.read_text())
    except (ValueError, TypeError, KeyError, AttributeError, ServeError):  # ValueError: bad JSON, or not UTF-8 at all
        path.unlink(missing_ok=True)  # a torn pid file names no server
        return None


def write_info(state_dir: Path, info: ServerInfo) -> None:
    tmp = state_dir / f".{PID_FILE}.tmp"
    tmp.write_text(info.to_json())
    tmp.replace(state_dir / PID_FILE)


def _wait_until_serving(proc: subprocess.Popen, info: ServerInfo, timeout: float, log: Path) -> None:
    """Until Triton is ready and a real request through every ensemble works."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise ServeError(f"tritonserver exited with code {proc.returncode}: {_log_errors(log)} (log: {log})")
        if is_ready(info.host, info.ports.http) and probe(info.http_url).ok:
            return
        if time.monotonic() > deadline:
            result = probe(info.http_url)
            why = _log_errors(log) if not is_ready(info.host, info.ports.http) else result.summary()
            raise ServeError(f"tritonserver not serving after {timeout:.0f}s: {why} (log: {log})")
        time.sleep(0.25)


def launch(state_dir: Path, info: ServerInfo, timeout: float) -> ServerInfo:
    """Start tritonserver for `info` (repository, host, ports, model control), record it, and wait
    until it serves; on failure stop what started and raise. Returns the recorded info."""
    install = find_triton()
    env = server_env(install)
    check_stub_numpy(env)
    backends = prepare_backends(install, state_dir)
    remove_shm(info.ports)  # regions a killed server left behind
    log = state_dir / LOG_FILE
    args = server_args(install, Path(info.served_repo), backends, host=info.host, ports=info.ports,
                       model_control=info.model_control)
    with open(log, "ab") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True)
    started = Process.of(proc.pid)
    info = replace(info, pid=proc.pid, process_started=started.started if started else 0, log=str(log), started=time.time())
    write_info(state_dir, info)
    try:
        _wait_until_serving(proc, info, timeout, log)
    except BaseException:
        stop_group(info.process)
        remove_shm(info.ports)
        if read_info(state_dir) == info:
            (state_dir / PID_FILE).unlink(missing_ok=True)
        raise
    return info


def start_server(repo: Path, state_dir: Path | None = None, *, host: str = "127.0.0.1", ports: Ports = Ports(),
                 timeout: float = 180.0, model_control: str = "none", allow_remote_model_control: bool = False,
                 supervise: bool = True) -> ServerInfo:
    """Start tritonserver on REPO and return once a real request through every ensemble works."""
    check_start(host, timeout, model_control, allow_remote_model_control)
    state_dir = Path(state_dir or default_state_dir())
    repo = Path(repo).resolve()
    if not repo.is_dir() or not any(repo.glob("*/config.pbtxt")):
        raise ServeError(f"expected a model repository with <model>/config.pbtxt, got {repo}")
    verify_repository(repo)
    if (recorded_hashes(repo) or {}).get("target", "embedded") != "embedded":  # onnxruntime_onnx: no such backend here
        raise ServeError(f"{repo} is the repository for NVIDIA's Triton container ('clfpipe repo --target container'): "
                         "expected the embedded one, which 'clfpipe repo --run RUN_DIR' makes")
    check_torch_packages(repo)
    running = read_info(state_dir)
    if running and is_our_server(running):
        raise ServeError(f"a server is already running (pid {running.pid}, http {running.http_url}): run 'clfpipe serve down' first")
    if running:
        clean_stale(state_dir, running)
    for name, port in asdict(ports).items():
        check_port_free(host, name, port)
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ServeError(f"cannot create the state folder {state_dir}: {exc.strerror or exc}") from exc
    info = ServerInfo(0, host, ports, str(repo), "", time.time(), served_repo=str(safe_path(repo)), model_control=model_control)
    info = launch(state_dir, info, timeout)
    if supervise:
        from clfpipe.serve.supervisor import start_supervisor

        info = start_supervisor(state_dir, info)
    return info


def served_engines(repo: Path) -> dict[str, str]:
    """Backbone -> the engine it runs on, as 'clfpipe repo' recorded it."""
    return dict((recorded_hashes(repo) or {}).get("engines") or {})


def check_torch_packages(repo: Path) -> None:
    """Load and run every AOTInductor package the repository serves in a child process first: a
    package that crashes its loader must not take a python stub (and its requests) down with it."""
    aoti = [model for model, engine in served_engines(repo).items() if engine == "aoti"]
    if not aoti:
        return
    import numpy as np
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    from clfpipe.runtime.torch_engine import load_check

    for model in aoti:
        config = text_format.Parse((repo / model / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
        sample = np.zeros((1, *config.input[0].dims), dtype=np.uint8)
        outputs, why = load_check("aoti", repo / model / "1" / "model.pt2", sample)
        if outputs is None:
            raise ServeError(f"{model}'s AOTInductor package does not load here: {why}; serve another engine "
                             "(--set serve.engine=torch or onnx, then 'clfpipe repo') or export it again here")


def clean_stale(state_dir: Path, info: ServerInfo) -> None:
    """A pid file whose server is gone: its shared memory and the file itself."""
    remove_shm(info.ports)
    (state_dir / PID_FILE).unlink(missing_ok=True)


def _group_alive(pgid: int) -> bool:
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def stop_group(process: Process, timeout: float = 30.0) -> None:
    """SIGTERM the process group that `process` leads (server and python stubs), SIGKILL what
    outlives timeout (at once for timeout 0). Nothing is signalled unless `process` is still the
    same process."""
    if not process.alive():
        return
    try:
        os.killpg(process.pid, signal.SIGTERM if timeout > 0 else signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while _group_alive(process.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if _group_alive(process.pid):
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def stop_server(state_dir: Path | None = None, timeout: float = 30.0) -> ServerInfo | None:
    """Stop the supervisor, then the server's process group; a stale pid file is only removed."""
    from clfpipe.serve.supervisor import stop_supervisor

    state_dir = Path(state_dir or default_state_dir())
    info = read_info(state_dir)
    if info is None:
        return None
    stop_supervisor(state_dir, info)
    info = read_info(state_dir) or info  # the supervisor may have restarted the server meanwhile
    if is_our_server(info):
        stop_group(info.process, timeout)
    remove_shm(info.ports)
    (state_dir / PID_FILE).unlink(missing_ok=True)
    return info


def server_status(state_dir: Path | None = None) -> tuple[ServerInfo | None, str]:
    """(info, state): 'ready' only when a real request through every ensemble works; else
    'unhealthy: <what failed>', 'starting' or 'not running'."""
    info = read_info(state_dir or default_state_dir())
    if info is None or not is_our_server(info):
        return info, "not running"
    if not is_ready(info.host, info.ports.http):
        return info, "starting"
    result = probe(info.http_url)
    return info, "ready" if result.ok else f"unhealthy: {result.summary()}"
