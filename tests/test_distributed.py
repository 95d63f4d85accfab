"""Training under torchrun on the CPU (gloo, 2 processes): DDP steps equal one process's step on the
whole batch, the demo recipe finishes with rank 0 alone writing, and a run resumes after a rank is
killed."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch.utils.data import DistributedSampler

from clfpipe.contract.manifest import RunDir
from clfpipe.contract.recipe import ModelConfig, StageConfig
from clfpipe.demo_data import DemoSpec, write_demo_dataset
from clfpipe.nn.models import build_model, set_trainable
from clfpipe.train.distributed import Dist, peer_stopped, per_rank_batch, without_option, wrap
from clfpipe.train.stage import criterion, make_optimizer, param_groups
from clfpipe.train.state import STATE_FILE
from tests.conftest import DEMO_RECIPE, ROOT

B = 4  # images per rank


def _step(model, x, y, dist, device=torch.device("cpu")):
    """One SGD step the way run_stage takes it (BatchNorm and dropout in eval: their per-rank
    statistics are what DDP does not average)."""
    stage = StageConfig(lr=(0.05,), momentum=0.9, weight_decay=1e-4)
    set_trainable(model, "all")
    forward = wrap(model, dist, device)
    optimizer = make_optimizer(stage, param_groups(model, stage.lr))
    model.eval()
    loss = criterion(forward(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _rank(rank: int, world: int, init: str, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.manual_seed(0)
    x, y = torch.randn(2 * B, 3, 32, 32), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    model = build_model(ModelConfig(arch="resnet18"), 3)
    mine = slice(rank * per_rank_batch(2 * B, Dist(rank, world)), (rank + 1) * B)
    params = _step(model, x[mine], y[mine], Dist(rank, world))
    if rank == 0:
        torch.save(params, out)
    torch.distributed.destroy_process_group()


def test_a_step_on_two_ranks_equals_one_step_on_the_whole_batch(tmp_path):
    out = tmp_path / "ddp.pt"
    mp.spawn(_rank, args=(2, f"file://{tmp_path / 'store'}", str(out)), nprocs=2, join=True)
    torch.manual_seed(0)
    x, y = torch.randn(2 * B, 3, 32, 32), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    single = _step(build_model(ModelConfig(arch="resnet18"), 3), x, y, Dist())
    ddp = torch.load(out, weights_only=True)
    worst = max(float((ddp[k].float() - single[k].float()).abs().max()) for k in single)
    assert worst < 1e-5, worst
    untrained = build_model(ModelConfig(arch="resnet18"), 3).state_dict()
    assert any(not torch.equal(untrained[k], single[k]) for k in single)  # the step moved the weights


def test_shards_are_disjoint_cover_the_data_and_reshuffle_alike():
    data = list(range(10))
    for epoch in (0, 1):
        shards = []
        for rank in range(2):
            sampler = DistributedSampler(data, num_replicas=2, rank=rank, shuffle=True, seed=0, drop_last=True)
            sampler.set_epoch(epoch)
            shards.append(list(sampler))
        assert not set(shards[0]) & set(shards[1]) and len(shards[0]) == len(shards[1]) == 5
    assert without_option(["-v", "train", "--nproc", "2", "--run", "r", "--nproc=3"], "--nproc") == ["-v", "train", "--run", "r"]
    with pytest.raises(Exception, match="a multiple of the 3 ranks"):
        per_rank_batch(16, Dist(0, 3))


FAST = ["--set", "stages.*.size=32", "--set", "stages.*.epochs=1", "--set", "stages.*.cycle_mult=1", "--set", "lr_find.num_it=20",
        "--set", "evaluate.tta=[]", "--set", "evaluate.report=false"]


@pytest.fixture
def small_data(tmp_path):
    write_demo_dataset(tmp_path / "data", spec=DemoSpec(train_per_class=16, valid_per_class=4, image_size=48))
    return tmp_path / "data"


def _train_on_two_ranks(data: Path, run: Path, cache: Path, writes: Path, *overrides: str, ok: bool = True) -> subprocess.CompletedProcess:
    """`clfpipe train` of the demo recipe (FAST) on 2 ranks through the tests' entry, which lists
    what each rank writes under the run and the cache into `writes`; it must succeed (or fail: ok=False)."""
    env = {**os.environ, "CLFPIPE_TEST_WATCH": os.pathsep.join([str(run), str(cache)]), "CLFPIPE_TEST_WRITES": str(writes),
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    launch = "import sys; from clfpipe.train.distributed import launch_local; sys.exit(launch_local(2, sys.argv[2:], [sys.argv[1]]))"
    command = [sys.executable, "-c", launch, str(ROOT / "tests" / "ddp_entry.py"), "train", "--data", str(data), "--run", str(run),
               "--recipe", str(DEMO_RECIPE), *FAST, "--set", f"data.cache_dir={cache}", *overrides]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert (result.returncode == 0) == ok, result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_the_demo_recipe_finishes_under_torchrun_and_only_rank_0_writes(small_data, tmp_path):
    run, cache, writes = tmp_path / "run", tmp_path / "cache", tmp_path / "writes"
    writes.mkdir()
    result = _train_on_two_ranks(small_data, run, cache, writes)
    manifest = RunDir(run).read()
    assert manifest.stage("train")["sessions"][0]["ranks"] == 2 and manifest.stage("train")["epochs"] == 4
    rank0 = (writes / "rank0.txt").read_text().split()
    assert any("manifest.json" in line for line in rank0) and any(".npy" in line for line in rank0)
    assert (writes / "rank1.txt").read_text().strip() == ""  # rank 1 wrote nothing in the run or the cache
    for rank in (0, 1):  # the process group was freed before the exit: a gloo group torn down during it can abort
        threads = (writes / f"threads{rank}.txt").read_text().split()
        assert threads and not [name for name in threads if "gloo" in name], threads
    assert len(list(cache.glob("*.npy"))) == 2  # one content-keyed file per split, as one process writes
    assert result.stderr.count("stage 3 grow epoch 1/1: train_loss") == 1  # one copy of the log


@pytest.mark.slow
def test_under_torchrun_each_rank_input_process_trains_as_its_threads_would(small_data, tmp_path):
    """data.input_process on 2 ranks: each rank's child deals its shard (the sampler crosses to it)
    and draws its rank's augmentation, so every epoch's losses are the threads' to the last digit."""
    losses = {}
    for mode in ("false", "true"):
        result = _train_on_two_ranks(small_data, tmp_path / f"run_{mode}", tmp_path / "cache", tmp_path, "--set", "data.decode=tensor",
                                     "--set", "data.num_workers=1", "--set", f"data.input_process={mode}")
        losses[mode] = re.findall(r"(stage \d .* epoch 1/1: train_loss \S+ valid_loss \S+)", result.stderr)
    assert len(losses["true"]) == 4 and losses["true"] == losses["false"]


def test_only_an_error_that_says_a_peer_has_gone_becomes_one_line():
    gloo = RuntimeError("[/src/gloo/transport/tcp/pair.cc:561] Connection closed by peer [127.0.0.1]:4284. This is "
                        "typically caused by a remote worker crashing.")
    assert str(peer_stopped(gloo, Dist(1, 2))) == ("rank 1 stopped because another rank did (Connection closed by peer "
                                                   "[127.0.0.1]:4284): that rank's error says why")
    assert peer_stopped(gloo, Dist()) is None  # one process has no peers
    assert peer_stopped(RuntimeError("mat1 and mat2 shapes cannot be multiplied"), Dist(0, 2)) is None  # a bug keeps its traceback


@pytest.mark.slow
@pytest.mark.parametrize("decode", ["pil", "tensor"])
def test_a_corrupt_image_under_torchrun_stops_every_rank_in_one_line_each(small_data, tmp_path, decode):
    """The rank that reads the file names it; its peer, left in a collective, says it stopped
    because another rank did (it printed gloo's 40-line traceback), or is stopped by the launcher."""
    victim = sorted((small_data / "train" / "vertical").glob("*.jpg"))[0]
    victim.write_bytes(victim.read_bytes()[:-200])  # its header is whole: the scan passes, the decode does not
    result = _train_on_two_ranks(small_data, tmp_path / "run", tmp_path / "cache", tmp_path, "--set", f"data.decode={decode}",
                                 "--set", "stages.0.precompute=false", ok=False)
    assert f"clfpipe: error: corrupt image file {victim}: not a decodable image: " in result.stderr
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    for line in result.stderr.splitlines():
        assert not line.startswith("clfpipe: error: rank") or re.fullmatch(
            r"clfpipe: error: rank \d stopped because another rank did \(.+\): that rank's error says why", line), line
    assert not (tmp_path / "run" / "manifest.json").exists()


def _rank_pid(rank: int) -> int | None:
    """The training process torchrun's launcher started as `rank` (its environment says so)."""
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            values = dict(item.split(b"=", 1) for item in environ.read_bytes().split(b"\0") if b"=" in item)
            cmdline = (environ.parent / "cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        if values.get(b"RANK") == str(rank).encode() and b"TORCHELASTIC_RUN_ID" in values and b"clfpipe" in cmdline:
            return int(environ.parent.name)
    return None


@pytest.mark.slow
def test_a_two_rank_run_resumes_after_a_rank_is_killed(small_data, tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "clfpipe", "train", "--nproc", "2", "--data", str(small_data), "--run", str(run),
            "--recipe", str(DEMO_RECIPE), *FAST, "--set", "stages.2.epochs=3", "--set", f"data.cache_dir={tmp_path / 'cache'}"]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (run / STATE_FILE).exists():
        assert proc.poll() is None, "training ended before a rank could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.1)
    victim = _rank_pid(1)
    assert victim is not None
    os.kill(victim, signal.SIGKILL)
    assert proc.wait(timeout=300) != 0 and not RunDir(run).exists()
    resumed = subprocess.run([sys.executable, "-m", "clfpipe", "train", "--nproc", "2", "--resume", str(run)], env=env,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    sessions = RunDir(run).read().stage("train")["sessions"]
    assert len(sessions) == 2 and (sessions[1]["stage"], sessions[1]["epoch"]) > (0, 0) and sessions[1]["ranks"] == 2
    assert np.isfinite(RunDir(run).read().stage("train")["valid_accuracy"])
