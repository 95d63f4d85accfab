"""A run killed with SIGKILL mid-stage resumes from its last epoch and ends with the same schedule."""

import csv
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from clfpipe.cli import main
from clfpipe.contract.manifest import RunDir
from clfpipe.contract.recipe import load_recipe
from clfpipe.demo_data import DemoSpec, write_demo_dataset
from clfpipe.train.loop import STATE_FILE, train_run

pytestmark = pytest.mark.slow

RECIPE = """
seed = 1
[data]
batch_size = 8
[[stages]]
name = "a"
epochs = 2
lr = 1e-3
schedule = "sgdr"
size = 32
[[stages]]
name = "b"
epochs = 3
lr = [1e-4, 3e-4, 1e-3]
schedule = "sgdr"
cycle_mult = 2
size = 40
[evaluate]
tta = []
report = false
"""


def _rows(run):
    with open(run / "metrics.csv") as fh:
        return list(csv.DictReader(fh))


def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path, capsys):
    data = tmp_path / "data"
    write_demo_dataset(data, spec=DemoSpec(train_per_class=8, valid_per_class=2, image_size=48))
    recipe_path = tmp_path / "recipe.toml"
    recipe_path.write_text(RECIPE)
    reference = tmp_path / "reference"
    train_run(data, reference, load_recipe(recipe_path))

    run = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "clfpipe.cli", "train", "--data", str(data), "--run", str(run),
                             "--recipe", str(recipe_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (run / STATE_FILE).exists():
        assert proc.poll() is None, "training ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)  # mid-run: after the first epoch's state, during the second
    proc.wait()
    assert not RunDir(run).exists(), "a killed run must not look complete"
    assert main(["export", "onnx", "--run", str(run)]) == 2  # nothing to export yet
    assert main(["train", "--data", str(data), "--run", str(run)]) == 2
    assert f"{run} already holds an unfinished run: expected a new run directory (or --resume {run} to continue it)" in \
        capsys.readouterr().err

    assert main(["train", "--resume", str(run)]) == 0
    manifest = RunDir(run).read()
    sessions = manifest.stage("train")["sessions"]
    assert len(sessions) == 2 and (sessions[1]["stage"], sessions[1]["epoch"]) > (0, 0)  # resumed past epoch 1
    assert not (run / STATE_FILE).exists()
    got, want = _rows(run), _rows(reference)
    lrs = lambda rows: [(r["stage"], r["epoch"], r["lr_body_early"], r["lr_body_late"], r["lr_head"]) for r in rows]  # noqa: E731
    assert lrs(got) == lrs(want)
    a = torch.load(run / "model.pt", weights_only=True)
    b = torch.load(reference / "model.pt", weights_only=True)
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    assert manifest.stage("train")["stage_lrs"] == RunDir(reference).read().stage("train")["stage_lrs"]
    capsys.readouterr()
    assert main(["train", "--data", str(data), "--run", str(run)]) == 2  # "--resume" would have nothing to continue
    assert capsys.readouterr().err == f"clfpipe: error: {run} already holds a finished run: expected a new run directory\n"


def test_resume_refuses_finished_or_empty_runs(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path)]) == 2
    assert "has no train_state.pt" in capsys.readouterr().err
