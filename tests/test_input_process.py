"""data.input_process: a run's training input in a process of its own gives the batches the
threads give, pass after pass and stage after stage (one child, one decoded-image cache), stops
its pass when the consumer does, passes its errors on, and ends with the run (on the CPU here: the
batches cross as shared memory, not CUDA IPC)."""

import contextlib
import glob
import logging
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from clfpipe.contract.dataset import scan_split
from clfpipe.contract.errors import DataError
from clfpipe.contract.recipe import load_recipe
from clfpipe.demo_data import DemoSpec, write_demo_dataset
from clfpipe.nn.models import build_model
from clfpipe.train.input_process import InputProcessError, ProcessBatches
from clfpipe.train.loop import train_run
from clfpipe.train.stage import Context, StageData

BASE = ["data.decode=tensor", "data.batch_size=4", "stages.0.size=32", "stages.0.augment=side_on"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("input") / "data"
    write_demo_dataset(out, spec=DemoSpec(train_per_class=6, valid_per_class=2, image_size=48))
    return out


def _context(data, tmp_path, *overrides: str, recipe: Path | None = None) -> Context:
    recipe = load_recipe(recipe, [*(BASE if recipe is None else []), *overrides])
    return Context(recipe, scan_split(data, "train"), scan_split(data, "valid"), torch.device("cpu"), tmp_path)


def _stage(ctx: Context, index: int = 0) -> StageData:
    return StageData(build_model(ctx.recipe.model, 3), ctx.recipe.stages[index], index, ctx)


def _passes(stage: StageData) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """What lr_find does (a pass left after two batches), then two seeded epochs and an unseeded pass."""
    stage.seed_epoch(-1)
    started = iter(stage.train_loader)
    left = [next(started), next(started)]
    started.close()
    out = [left]
    for epoch in (0, 1):
        stage.seed_epoch(epoch)
        out.append(list(stage.train_loader))
    out.append(list(stage.train_loader))  # no seed: the generators go on
    return out


def _same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))


@pytest.mark.parametrize("workers", [0, 2])
def test_the_input_process_gives_the_threads_batches_pass_after_pass(data, tmp_path, workers):
    with contextlib.closing(_context(data, tmp_path, f"data.num_workers={workers}")) as ctx, \
            contextlib.closing(_stage(ctx)) as stage:
        threads = _passes(stage)
    with contextlib.closing(_context(data, tmp_path, f"data.num_workers={workers}", "data.input_process=true")) as ctx, \
            contextlib.closing(_stage(ctx)) as stage:
        assert isinstance(stage.train_loader, ProcessBatches) and len(stage.train_loader) == 4
        process = _passes(stage)
    assert [len(p) for p in process] == [2, 4, 4, 4]
    assert all(_same(a, b) for a, b in zip(threads, process))
    assert not torch.equal(process[1][0][0], process[2][0][0])  # each epoch its own draws


DEMO_RECIPE = Path(__file__).parents[1] / "recipes" / "demo.toml"
IMAGE_STAGES = (1, 3)  # demo.toml's head_augmented at 48 px and grow at 64 (0 is precomputed)


def _stages(ctx: Context) -> tuple[list[list], list[int], list[int | None]]:
    """Two epochs of each image stage: the batches, the images each pass decoded, and the input
    process (None: threads) each stage used."""
    passes, decoded, pids = [], [], []
    for index in IMAGE_STAGES:
        with contextlib.closing(_stage(ctx, index)) as stage:
            for epoch in (0, 1):
                before = ctx.decoded.decoded
                stage.seed_epoch(epoch)
                passes.append(list(stage.train_loader))
                decoded.append(stage.train_loader.decoded if isinstance(stage.train_loader, ProcessBatches)
                               else ctx.decoded.decoded - before)
            pids.append(ctx.input_process.pid if ctx.recipe.data.input_process else None)
    return passes, decoded, pids


def test_one_input_process_serves_every_stage_of_a_run_from_one_cache(data, tmp_path):
    common = ("data.decode=tensor", "data.batch_size=4", "data.num_workers=2", "data.decoded_cache_gib=1")
    with contextlib.closing(_context(data, tmp_path, *common, recipe=DEMO_RECIPE)) as ctx:
        threads, threads_decoded, _ = _stages(ctx)
    with contextlib.closing(_context(data, tmp_path, *common, "data.input_process=true", recipe=DEMO_RECIPE)) as ctx:
        process, process_decoded, pids = _stages(ctx)
        child = ctx.input_process._child
        assert _workers_of(child.pid) == []  # the last stage closed: its loader's workers stopped, the child stays
        assert child.is_alive()
    assert not child.is_alive() and child.exitcode == 0  # the run's end ends it
    assert [b[0][0].shape[-1] for b in process] == [48, 48, 64, 64]
    assert all(_same(a, b) for a, b in zip(threads, process))
    assert pids[0] == pids[1] is not None
    # each file decoded once a run, whatever the stage: the second stage finds the first's pixels
    assert process_decoded == threads_decoded and sum(process_decoded) <= len(scan_split(data, "train"))
    assert process_decoded[0] == 16 and sum(process_decoded[2:]) < 8  # 4 batches of 4 a pass


def _workers_of(pid: int) -> list[int]:
    """The processes `pid` has started and not ended (any thread's), polled for up to 10 s while there are some."""
    deadline = time.monotonic() + 10
    while True:
        found = [c for c in _children(pid) if _alive(c)]
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def test_an_unreadable_image_in_the_input_process_is_the_stage_error(data, tmp_path):
    broken = tmp_path / "data"
    write_demo_dataset(broken, spec=DemoSpec(train_per_class=2, valid_per_class=1, image_size=48))
    with contextlib.closing(_context(broken, tmp_path, "data.input_process=true", "data.batch_size=6")) as ctx:
        with contextlib.closing(_stage(ctx)) as stage:
            for victim in (broken / "train").rglob("*.jpg"):  # cut short after the scan: every batch holds one
                victim.write_bytes(victim.read_bytes()[:300])
            stage.seed_epoch(0)
            with pytest.raises(DataError, match=r"^corrupt image file .*/train/\w+/\w+\.jpg: not a decodable image: \w"):
                list(stage.train_loader)
            child = ctx.input_process._child
        assert child.is_alive()  # still serving: the run decides what happens next
    assert not child.is_alive() and child.exitcode == 0


def test_closing_the_run_mid_pass_ends_the_input_process(data, tmp_path):
    ctx = _context(data, tmp_path, "data.input_process=true")
    stage = _stage(ctx)
    batches = iter(stage.train_loader)
    next(batches)  # the child has its pass under way, the queue full behind it
    with pytest.raises(RuntimeError, match="one pass at a time"):
        next(iter(stage.train_loader))
    child = ctx.input_process._child
    start = time.perf_counter()
    batches.close()
    stage.close()
    ctx.close()
    assert not child.is_alive() and child.exitcode == 0 and time.perf_counter() - start < 10


def test_the_run_ends_with_every_shared_batch_taken_back(data, tmp_path, caplog):
    """A pass left without being closed (an error's traceback can keep it) still has the child's
    batches in the queue when the run ends: the parent takes each back and lets it go before the
    child frees their memory and ends (on a GPU a batch never taken stays counted as held, and
    the child's exit aborted)."""
    ctx = _context(data, tmp_path, "data.input_process=true", "data.batch_size=2")
    stage = _stage(ctx)
    batches = iter(stage.train_loader)
    next(batches)
    time.sleep(1)  # the child fills the queue behind the batch taken
    child = ctx.input_process._child
    with caplog.at_level(logging.DEBUG, logger="clfpipe.train.input_process"):
        ctx.close()
    ends = [r.getMessage() for r in caplog.records if "taken back at its end" in r.getMessage()]
    assert len(ends) == 1 and "did not say" not in ends[0]
    assert int(ends[0].split(": ")[1].split()[0]) >= 1  # at least the batches that waited in the queue
    assert not child.is_alive() and child.exitcode == 0
    del batches  # closed now: the child is gone, nothing left to drain


def test_a_killed_input_process_is_one_clear_error(data, tmp_path):
    with contextlib.closing(_context(data, tmp_path, "data.input_process=true")) as ctx, \
            contextlib.closing(_stage(ctx)) as stage:
        batches = iter(stage.train_loader)
        next(batches)
        ctx.input_process._child.kill()  # the kernel's OOM killer, or a user's kill -9
        start = time.perf_counter()
        with pytest.raises(InputProcessError, match=r"input process ended \(exit code -9"):
            for _ in range(10):  # what it had queued first
                next(batches)
        assert time.perf_counter() - start < 10


CHILD_OF_A_KILLED_PARENT = """
import sys, torch
from clfpipe.contract.dataset import scan_split
from clfpipe.contract.recipe import load_recipe
from clfpipe.nn.models import build_model
from clfpipe.train.stage import Context, StageData
recipe = load_recipe(None, sys.argv[2:])
ctx = Context(recipe, scan_split(sys.argv[1], "train"), scan_split(sys.argv[1], "valid"), torch.device("cpu"), ".")
stage = StageData(build_model(recipe.model, 3), recipe.stages[0], 0, ctx)
next(iter(stage.train_loader))
print(ctx.input_process.pid, flush=True)
input()
"""


def test_the_input_process_ends_itself_when_its_parent_is_killed(data):
    parent = subprocess.Popen([sys.executable, "-c", CHILD_OF_A_KILLED_PARENT, str(data), *BASE, "data.input_process=true"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        child = int(parent.stdout.readline())
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)
        deadline = time.monotonic() + 15
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(child)
    finally:
        parent.kill()


def _children(pid: int) -> list[int]:
    """The children of each of pid's threads; a thread that ends while it is read has none."""
    found = []
    for name in glob.glob(f"/proc/{pid}/task/*/children"):
        try:
            found += [int(c) for c in Path(name).read_text().split()]
        except OSError:
            pass
    return found


def _alive(pid: int) -> bool:
    """Whether pid runs (a zombie, ended but not yet reaped by init, counts as ended). A process that
    ends between the open and the read of its stat raises ESRCH (ProcessLookupError), not ENOENT."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.parametrize("decode", ["tensor", "pil"])
def test_a_run_trains_with_its_input_in_a_process(data, tmp_path, caplog, decode):
    """With Pillow decoding there is no device input to move: the run says so and trains as it would."""
    recipe = load_recipe(None, [f"data.decode={decode}", "data.input_process=true", "data.num_workers=2", "data.batch_size=6",
                                "stages.0.epochs=1", "stages.0.size=32", "evaluate.tta=[]", "evaluate.report=false"])
    with caplog.at_level(logging.INFO, logger="clfpipe.train.loop"):
        manifest = train_run(data, tmp_path / "run", recipe)
    assert manifest.stage("train")["epochs"] == 1
    ignored = [r for r in caplog.records if "data.input_process has no effect" in r.getMessage()]
    assert len(ignored) == (decode == "pil")
    assert any(("in the run's input process" in r.getMessage()) == (decode == "tensor") for r in caplog.records
               if r.getMessage().startswith("train: ") and "decoded" in r.getMessage())
