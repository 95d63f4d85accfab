"""Training on several processes: PyTorch DDP under ``torchrun`` (NCCL on CUDA, gloo on CPU).

``data.batch_size`` is the global batch: each of the N ranks takes batch_size / N per step and DDP
averages the gradients, so a step on N ranks is the step one process takes on the whole batch and
the recipe's learning rates carry over unchanged. BatchNorm statistics are the exception: each
rank normalises with its own share of the batch, unless ``distributed.sync_batchnorm`` (CUDA only)
gathers them. Rank 0 alone writes (run directory, manifest, metrics, plots, checkpoints, the
precompute cache); lr_find runs on rank 0 and its suggestion is broadcast.
"""

from __future__ import annotations

import gc
import logging
import os
import re
import sys
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as torch_dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from clfpipe.contract.errors import ClfpipeError, RecipeError, first_line

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


SINGLE = Dist()


def from_env() -> Dist:
    """What torchrun says this process is (RANK, WORLD_SIZE, LOCAL_RANK); one process otherwise."""
    try:
        dist = Dist(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0)))
    except ValueError as exc:
        raise RecipeError(f"torchrun environment: expected integer RANK, WORLD_SIZE and LOCAL_RANK, got {exc}") from exc
    if not 0 <= dist.rank < dist.world:
        raise RecipeError(f"torchrun environment: expected 0 <= RANK < WORLD_SIZE, got RANK={dist.rank} WORLD_SIZE={dist.world}")
    return dist


MAX_NPROC = 1024


def check_nproc(nproc: int) -> None:
    if not 1 <= nproc <= MAX_NPROC:
        raise RecipeError(f"--nproc: expected 1 to {MAX_NPROC} processes, got {nproc}")


def launch_local(nproc: int, argv: list[str], entry: list[str] | None = None) -> int:
    """Run `clfpipe <argv>` (or `entry <argv>`) on `nproc` processes of this machine, as torchrun
    --standalone does, through torch's launcher API (torchrun's own command line would take
    clfpipe's --run for its --run-path); 0, or 1 when a rank failed."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    check_nproc(nproc)
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"clfpipe-{os.getpid()}",
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.5)
    args = [*(entry or ["-m", "clfpipe"]), *argv]
    log.info("train: %d processes: %s %s", nproc, sys.executable, " ".join(args))
    try:
        elastic_launch(config, entrypoint=sys.executable)(*args)
    except ChildFailedError as exc:
        failures = ", ".join(f"rank {r} exit {f.exitcode}" for r, f in sorted(exc.failures.items()))
        log.error("train: a rank failed (%s)", failures)
        return 1
    return 0


def without_option(argv: list[str], option: str) -> list[str]:
    """argv minus `option VALUE` and `option=VALUE`."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == option:
            skip = True
        elif not arg.startswith(option + "="):
            out.append(arg)
    return out


def setup(dist: Dist, device: torch.device) -> torch.device:
    """Join the process group (once) and return this rank's device."""
    if not dist.active:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    if not torch_dist.is_initialized():
        torch_dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", rank=dist.rank,
                                      world_size=dist.world)
    if not dist.main:  # one copy of the log: rank 0's
        logging.getLogger("clfpipe").setLevel(logging.WARNING)
    return device


def teardown(dist: Dist) -> None:
    """Leave the process group while the interpreter is whole: first collect what still refers to it
    from cyclic garbage (a DDP wrapper), so the group is freed and its gloo threads are joined here."""
    if dist.active and torch_dist.is_initialized():
        gc.collect()
        torch_dist.destroy_process_group()


class PeerStopped(ClfpipeError):
    """A collective failed because another rank stopped: that rank's own error says why."""


# What a collective raises when a peer process has gone: gloo's socket errors (a plain RuntimeError)
# and torch's own distributed errors. A rank that stops on a corrupt image in its shard left its
# peers with a 40-line gloo traceback beside its one-line error.
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")


def peer_stopped(exc: BaseException, dist: Dist) -> PeerStopped | None:
    """The one-line error for ``exc`` when it says another rank has gone, else None."""
    if not dist.active or not isinstance(exc, RuntimeError):
        return None
    text = str(exc).strip()
    if not (isinstance(exc, torch_dist.DistError) or any(marker in text for marker in _PEER_GONE)):
        return None
    # the first sentence, without gloo's source location ("[.../pair.cc:561] ")
    first = re.sub(r"^\[[^\]]*:\d+\]\s*", "", first_line(exc)).split(". ")[0]
    return PeerStopped(f"rank {dist.rank} stopped because another rank did ({first}): that rank's error says why")


def per_rank_batch(batch_size: int, dist: Dist) -> int:
    if batch_size % dist.world or batch_size < 2 * dist.world:  # BatchNorm trains on 2 or more a rank
        raise RecipeError(f"data.batch_size: expected a multiple of the {dist.world} ranks (the batch is global) and at "
                          f"least 2 images a rank, got {batch_size}")
    return batch_size // dist.world


def barrier(dist: Dist) -> None:
    if dist.active:
        torch_dist.barrier()


def broadcast(value: T, dist: Dist) -> T:
    """Rank 0's value on every rank (any picklable object)."""
    if not dist.active:
        return value
    box = [value if dist.main else None]
    torch_dist.broadcast_object_list(box, src=0)
    return box[0]  # type: ignore[return-value]


def mean(value: float, dist: Dist) -> float:
    """The mean of every rank's value."""
    if not dist.active:
        return value
    tensor = torch.tensor([value], dtype=torch.float64)
    torch_dist.all_reduce(tensor)
    return float(tensor.item()) / dist.world


def gather_rows(rows: np.ndarray, dist: Dist) -> np.ndarray:
    """Every rank's rows, concatenated in rank order, on every rank."""
    if not dist.active:
        return rows
    parts: list[Any] = [None] * dist.world
    torch_dist.all_gather_object(parts, rows)
    return np.concatenate(parts)


def wrap(module: nn.Module, dist: Dist, device: torch.device, sync_batchnorm: bool = False) -> nn.Module:
    """DDP around a module whose trainable parameters are set (one wrapper per stage: what
    trains changes between stages); the module itself when there is one rank."""
    if not dist.active:
        return module
    if sync_batchnorm:
        if device.type != "cuda":
            raise RecipeError("distributed.sync_batchnorm: expected CUDA (torch's SyncBatchNorm runs on GPUs), got the CPU")
        module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)
