"""One writer at a time per run directory (``clfpipe.contract.lock``): a second process is refused
in one line naming the first; the lock goes with its process, even one killed, and not to the
children it forked."""

import multiprocessing
import os
import signal
import subprocess
import sys
import time

import pytest

from clfpipe.cli import main
from clfpipe.contract.errors import ManifestError
from clfpipe.contract.lock import LOCK_FILE, run_lock

HOLD = """
import sys, time
from pathlib import Path
from clfpipe.contract.lock import run_lock
with run_lock(Path(sys.argv[1]), sys.argv[2]):
    print("held", flush=True)
    time.sleep(600)
"""


def _hold(run):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run), "train"], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


@pytest.fixture
def holder(tmp_path):
    """Another process that holds tmp_path/run, a new folder, as 'train' until it is killed."""
    run = tmp_path / "run"
    run.mkdir()
    proc = _hold(run)
    yield run, proc
    proc.kill()
    proc.wait()


@pytest.fixture
def trained_holder(run_copy):
    """The same, holding a trained and exported run."""
    proc = _hold(run_copy)
    yield run_copy, proc
    proc.kill()
    proc.wait()


def test_a_second_process_is_refused_naming_the_holder(holder):
    run, proc = holder
    with pytest.raises(ManifestError, match=rf"is in use by train \(pid {proc.pid}, since .*\): expected one writer at a time"):
        with run_lock(run, "export onnx"):
            pass


def test_the_lock_goes_with_its_process_even_killed(holder):
    run, proc = holder
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with run_lock(run, "train --resume"):
        assert "train --resume (pid " in (run / LOCK_FILE).read_text()
    assert (run / LOCK_FILE).read_text() == ""  # the holder's line goes with the lock


def test_nested_use_in_one_process_holds_once(tmp_path):
    with run_lock(tmp_path, "repo"):
        with run_lock(tmp_path, "export onnx"):  # repo exports what it serves first
            pass
        assert "repo (pid " in (tmp_path / LOCK_FILE).read_text()
    assert (tmp_path / LOCK_FILE).read_text() == ""


def test_an_entry_point_holds_the_run_given_by_position_or_name(tmp_path):
    from clfpipe.contract.lock import holding_run

    @holding_run("export onnx")
    def export(run_dir, variant="onnx"):
        return (run_dir / LOCK_FILE).read_text()

    assert export(tmp_path).startswith("export onnx (pid ") and export(run_dir=tmp_path).startswith("export onnx (pid ")


def _sleep() -> None:
    time.sleep(600)


def test_a_forked_child_does_not_keep_the_lock(tmp_path):
    """Loader workers are forked while training holds the run; with flock they would keep holding it
    after training let go, and the export that follows in the same process would be refused."""
    with run_lock(tmp_path, "train"):
        child = multiprocessing.get_context("fork").Process(target=_sleep, daemon=True)
        child.start()
    try:
        out = subprocess.run([sys.executable, "-c", HOLD.replace("time.sleep(600)", "pass"), str(tmp_path), "export"],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and out.stdout.strip() == "held", out.stderr
    finally:
        child.kill()


@pytest.mark.parametrize("argv", [["train", "--resume", "{run}"], ["export", "onnx", "--run", "{run}", "--precision", "fp16"],
                                  ["export", "pt2", "--run", "{run}", "--no-aoti"], ["repo", "--run", "{run}"],
                                  ["lr-find", "--run", "{run}"]])
def test_commands_that_write_a_run_are_refused_while_another_writes_it(trained_holder, capsys, argv):
    """train --resume while the first training still ran trained a second copy into the same
    folder; each overwrote the other's checkpoints and manifest."""
    run, proc = trained_holder
    assert main([a.format(run=run) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"clfpipe: error: {run.resolve()} is in use by train (pid {proc.pid}, since ") and len(err.splitlines()) == 1


def test_a_new_training_into_a_run_being_trained_is_refused(holder, tmp_path, capsys):
    from clfpipe.demo_data import DemoSpec, write_demo_dataset

    run, proc = holder
    data = tmp_path / "data"
    write_demo_dataset(data, spec=DemoSpec(train_per_class=2, valid_per_class=1, image_size=32))
    assert main(["train", "--data", str(data), "--run", str(run)]) == 2
    assert f"is in use by train (pid {proc.pid}" in capsys.readouterr().err
    assert sorted(os.listdir(run)) == [LOCK_FILE]  # nothing of the refused one written


def test_the_demo_does_not_clear_a_run_another_process_writes(holder, capsys):
    run, proc = holder
    (run / "recipe.resolved.toml").write_text("")  # a run: the demo would clear it
    assert main(["demo", "--workdir", str(run.parent)]) == 2
    assert f"is in use by train (pid {proc.pid}" in capsys.readouterr().err and (run / "recipe.resolved.toml").exists()


@pytest.mark.parametrize("argv", [["export", "pt2", "--run", "{run}"], ["lr-find", "--run", "{run}"],
                                  ["export", "trt", "--run", "{run}"], ["train", "--resume", "{run}"]])
def test_a_run_that_is_not_there_is_named_so(tmp_path, capsys, argv):
    """It was 'cannot lock the run directory ...: No such file or directory'."""
    run = tmp_path / "nothing"
    assert main([a.format(run=run) for a in argv]) == 2
    assert capsys.readouterr().err.strip() == f"clfpipe: error: run directory not found: {run}"
