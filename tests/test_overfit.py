"""Training until over-fitting: a stage with until = "overfit" stops at the first SGDR cycle end no
better than the best, and ends with the best one's weights, also across a kill and --resume."""

import csv
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from clfpipe.cli import main
from clfpipe.contract.errors import RecipeError
from clfpipe.contract.manifest import RunDir
from clfpipe.contract.recipe import StageConfig, load_recipe
from clfpipe.demo_data import DemoSpec, write_demo_dataset
from clfpipe.nn.reference import load_run_model
from clfpipe.train.data import run_splits
from clfpipe.train.evaluate import predict_logits
from clfpipe.train.loop import STATE_FILE, train_run
from clfpipe.train.overfit import CycleEnd, better, cycle_ends, improves


def test_cycle_ends_are_the_running_sums_of_the_sgdr_cycles():
    watched = dict(schedule="sgdr", until="overfit")
    assert cycle_ends(StageConfig(epochs=15, cycle_len=1, cycle_mult=2, **watched)) == {1, 3, 7, 15}
    assert cycle_ends(StageConfig(epochs=6, cycle_len=2, cycle_mult=1, **watched)) == {2, 4, 6}
    assert cycle_ends(StageConfig(epochs=3, cycle_len=3, **watched)) == {3}  # one cycle: nothing to compare it with
    assert cycle_ends(StageConfig(epochs=7, cycle_len=1, cycle_mult=2, schedule="sgdr")) == frozenset()  # not watched


@pytest.mark.parametrize("end, best, want", [
    (CycleEnd(1, 0.5, 1.0), None, True),
    (CycleEnd(3, 0.6, 2.0), CycleEnd(1, 0.5, 1.0), True),  # the metric first, though the loss rose
    (CycleEnd(3, 0.4, 0.1), CycleEnd(1, 0.5, 1.0), False),  # a lower metric, though the loss fell
    (CycleEnd(3, 0.5, 0.9), CycleEnd(1, 0.5, 1.0), True),  # a tie on the metric: the lower loss wins
    (CycleEnd(3, 0.5, 1.0), CycleEnd(1, 0.5, 1.0), False),  # no better is not better
    (CycleEnd(3, 0.5, 1.1), CycleEnd(1, 0.5, 1.0), False),
    (CycleEnd(3, 0.9, math.nan), CycleEnd(1, 0.5, 1.0), False),  # diverged
    (CycleEnd(1, 0.9, math.inf), None, False),
])
def test_a_cycle_end_is_better_by_its_metric_then_its_loss(end, best, want):
    assert better(end, best) is want


@pytest.mark.parametrize("end, want", [
    (CycleEnd(3, 0.6, 2.0), True),  # a higher metric, though the loss rose
    (CycleEnd(3, 0.4, 0.7), True),  # the loss fell below the lowest, though the metric fell (still learning)
    (CycleEnd(3, 0.5, 0.8), False),  # neither: over-fitting
    (CycleEnd(3, 0.4, 0.9), False),
    (CycleEnd(3, 0.9, math.nan), False),  # diverged after a best
])
def test_a_cycle_end_improves_on_the_metric_or_on_the_lowest_loss(end, want):
    best = CycleEnd(1, 0.5, 1.0)  # the highest metric so far; a later end with a lower metric had the lowest loss
    assert improves(end, best, lowest_loss=0.8) is want
    assert improves(end, None, lowest_loss=math.inf)  # the first end has nothing to be compared with


def test_until_is_checked_as_one_line():
    with pytest.raises(RecipeError, match=r"stage 'fit' until: expected one of epochs, overfit, got 'best'"):
        StageConfig(until="best")
    with pytest.raises(RecipeError) as err:
        load_recipe(None, ["stages.0.until=overfit"])  # the default schedule is cosine: no cycle ends
    assert str(err.value) == ("stage 'fit' until: \"overfit\" stops at the end of an SGDR cycle: expected schedule = "
                              "\"sgdr\", got 'cosine'")


HEAD = """
seed = 1
[model]
arch = "resnet18"
[data]
batch_size = 8
[evaluate]
tta = []
report = false
"""
FIT = """
[[stages]]
name = "fit"
epochs = 6
lr = 3e-3
schedule = "sgdr"
size = 32
until = "overfit"
optimizer = "adamw"
"""
GROW = """
[[stages]]
name = "grow"
epochs = 2
lr = 1e-4
schedule = "sgdr"
size = 64
optimizer = "adamw"
"""


@pytest.fixture
def misled(tmp_path):
    """Demo data whose validation folders each hold the next class's images: the more the model
    learns of the training images, the worse it does on these, so the first stage over-fits early."""
    data = tmp_path / "data"
    write_demo_dataset(data, spec=DemoSpec(train_per_class=24, valid_per_class=6, image_size=48))
    names = sorted(p.name for p in (data / "valid").iterdir())
    for name in names:
        (data / "valid" / name).rename(data / "valid" / f"{name}.old")
    for name, nxt in zip(names, names[1:] + names[:1]):
        (data / "valid" / f"{name}.old").rename(data / "valid" / nxt)
    return data


def _rows(run):
    with open(run / "metrics.csv") as fh:
        return list(csv.DictReader(fh))


def _recipe(tmp_path, *stages):
    path = tmp_path / "recipe.toml"
    path.write_text(HEAD + "".join(stages))
    return path


@pytest.mark.slow
def test_the_stage_stops_at_the_first_worse_cycle_end_with_the_best_weights(misled, tmp_path):
    run = tmp_path / "run"
    manifest = train_run(misled, run, load_recipe(_recipe(tmp_path, FIT)))
    figures = manifest.stage("train")
    [stopped] = figures["stopped_at_overfitting"]
    rows = _rows(run)
    assert stopped["stage"] == "fit" and stopped["max_epochs"] == 6
    assert len(rows) == stopped["epochs"] < 6  # the epochs after the stop never ran
    # every epoch ends a cycle here (cycle_len 1, cycle_mult 1): each end before the last raised the
    # highest accuracy or lowered the lowest loss of the ends before it, the last did neither, and the
    # kept one is the best before the stop (the highest accuracy, the lower loss breaking a tie)
    assert [int(r["epoch"]) for r in rows] == list(range(1, len(rows) + 1))
    acc, loss = [float(r["accuracy"]) for r in rows], [float(r["valid_loss"]) for r in rows]
    for i in range(1, len(rows) - 1):
        assert acc[i] > max(acc[:i]) or loss[i] < min(loss[:i])
    assert acc[-1] <= max(acc[:-1]) and loss[-1] >= min(loss[:-1])
    best = max(range(len(rows) - 1), key=lambda i: (acc[i], -loss[i]))
    assert stopped["kept_epoch"] == best + 1 < len(rows)
    _check_kept_weights(run, rows[best], rows[-1])


def _check_kept_weights(run, kept, last):
    """model.pt holds the kept epoch's weights: its validation loss is that epoch's row's, not the
    last one's, and the manifest's figures are that epoch's too."""
    manifest = RunDir(run).read()
    figures = manifest.stage("train")
    _, valid = run_splits(RunDir(run), manifest)
    logits = predict_logits(load_run_model(RunDir(run), manifest), valid, spec=manifest.recipe.preprocess_spec(),
                            batch_size=8, device=torch.device("cpu"))
    loss = float(torch.nn.functional.cross_entropy(torch.from_numpy(logits), torch.tensor(valid.labels)))
    assert loss == pytest.approx(float(kept["valid_loss"]), rel=1e-4)
    assert loss != pytest.approx(float(last["valid_loss"]), rel=1e-3)
    assert figures["valid_loss"] == pytest.approx(float(kept["valid_loss"]))
    assert figures["valid_accuracy"] == pytest.approx(float(kept["accuracy"]))
    assert float(np.mean(logits.argmax(1) == np.asarray(valid.labels))) == pytest.approx(figures["valid_accuracy"])


@pytest.mark.slow
def test_a_run_killed_after_the_stop_resumes_into_the_next_stage(misled, tmp_path):
    data, recipe_path = misled, _recipe(tmp_path, FIT, GROW)
    reference = tmp_path / "reference"
    train_run(data, reference, load_recipe(recipe_path))

    run = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "clfpipe.cli", "train", "--data", str(data), "--run", str(run),
                             "--recipe", str(recipe_path)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:  # the state saved before this line is the last epoch's; the stop's comes next
        if "over-fitting" in line:
            break
    else:
        pytest.fail(f"the stage never stopped (exit {proc.wait()})")
    before, deadline = os.stat(run / STATE_FILE).st_mtime_ns, time.monotonic() + 60
    while os.stat(run / STATE_FILE).st_mtime_ns == before:
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    state = torch.load(run / STATE_FILE, map_location="cpu", weights_only=True)
    assert (state["stage"], state["ended"]) == (0, True), "killed later than the stop's save: the next stage had begun"

    assert main(["train", "--resume", str(run)]) == 0
    got, want = RunDir(run).read().stage("train"), RunDir(reference).read().stage("train")
    assert got["stopped_at_overfitting"] == want["stopped_at_overfitting"]
    assert [(r["stage"], r["epoch"]) for r in _rows(run)] == [(r["stage"], r["epoch"]) for r in _rows(reference)]
    assert (got["sessions"][1]["stage"], got["sessions"][1]["epoch"]) == (0, want["stopped_at_overfitting"][0]["epochs"])


@pytest.mark.slow
def test_every_rank_stops_and_restores_alike_under_torchrun(misled, tmp_path):
    """Rank 0 measures each cycle end and every rank decides on it: a rank that went on training
    alone would wait forever in its next gradient exchange."""
    run = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "clfpipe", "train", "--nproc", "2", "--data", str(misled), "--run", str(run),
                             "--recipe", str(_recipe(tmp_path, FIT))], env={**os.environ, "OMP_NUM_THREADS": "1"},
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    [stopped] = RunDir(run).read().stage("train")["stopped_at_overfitting"]
    rows = _rows(run)
    assert len(rows) == stopped["epochs"] < 6 and result.stderr.count("stage 0 fit: over-fitting") == 1  # one rank logs
    assert (f"fit stopped at over-fitting after {stopped['epochs']} of 6 epochs, epoch {stopped['kept_epoch']}'s weights kept"
            in result.stderr.splitlines()[-1])
    _check_kept_weights(run, rows[stopped["kept_epoch"] - 1], rows[-1])
