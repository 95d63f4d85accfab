"""Shared fixtures: the demo data, one trained run and one real Triton server per test session."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import pytest

from clfpipe.contract.errors import DataError
from clfpipe.contract.recipe import load_recipe
from clfpipe.demo_data import write_demo_dataset

ROOT = Path(__file__).resolve().parent.parent
DEMO_RECIPE = ROOT / "recipes" / "demo.toml"


# The session's run directories at their peak: 3.7 GB measured (the session fixtures' runs, and the
# README test's 1.5 GB while it runs; a passing test's tmp_path goes at its end).
NEEDS_FREE_GIB = 4.0


def pytest_sessionstart(session: pytest.Session) -> None:
    """Stop at once, in one line, where the disk cannot hold the runs: a full disk otherwise shows
    as dozens of unrelated errors (a stop's CI run failed that way)."""
    where = Path(session.config.option.basetemp or tempfile.gettempdir())
    while not where.exists():
        where = where.parent
    free = shutil.disk_usage(where).free / 2**30
    if free < NEEDS_FREE_GIB:
        pytest.exit(f"expected at least {NEEDS_FREE_GIB:.0f} GiB free in {where} for the tests' run directories, "
                    f"got {free:.1f} GiB", returncode=1)


def free_port() -> int:
    from clfpipe.serve.server import free_port as free

    return free()


@pytest.fixture
def read_table(tmp_path: Path) -> Callable[[Callable[[Path], Any], bytes], Any]:
    """``read_table(reader, content)``: what ``reader`` makes of a CSV file holding ``content``, or
    None after the one-line DataError it must raise for anything it cannot read."""
    def read(reader: Callable[[Path], Any], content: bytes) -> Any:
        path = tmp_path / "labels.csv"
        path.write_bytes(content)
        try:
            return reader(path)
        except DataError as exc:
            assert str(exc) and "\n" not in str(exc)
            return None

    return read


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "data"
    write_demo_dataset(out, seed=0)
    return out


@pytest.fixture(scope="session")
def trained_run(demo_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`clfpipe run` with the demo recipe, once for the whole session (about 3 minutes):
    trained, exported (plain, folded preprocessing, folded TTA) and with its repository."""
    from clfpipe.pipeline import run_pipeline

    run = tmp_path_factory.mktemp("runs") / "demo"
    run_pipeline(demo_data, run, load_recipe(DEMO_RECIPE))
    return run


@pytest.fixture
def run_copy(trained_run: Path, tmp_path: Path) -> Path:
    """A private copy of the trained run that a test may damage."""
    dst = tmp_path / "run"
    shutil.copytree(trained_run, dst, ignore=shutil.ignore_patterns("model_repository"))
    return dst


@pytest.fixture(scope="session")
def server_state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The state folder (pid file, log) of the session's server: what clients find it by."""
    return tmp_path_factory.mktemp("server")


@pytest.fixture(scope="session")
def server(trained_run: Path, server_state: Path):
    """A real tritonserver on free loopback ports, serving the trained run."""
    from clfpipe.serve.server import Ports, start_server, stop_server

    # No supervisor: its probes would show in the statistics the batching tests read exactly
    info = start_server(trained_run / "model_repository", server_state, ports=Ports.free(),
                        supervise=False)
    yield info
    stop_server(server_state)
