"""A run's training input in a process of its own (``data.input_process``).

The device-decode path's input (loader workers reading files, then ``DeviceBatches``: the decode
and augmentation threads on their own CUDA streams) runs in a spawned child, one for the run's
image stages: it keeps its decoded images (``DecodedCache``) from stage to stage, as the threads'
path does, and its start (an interpreter, torch, a CUDA context: 2.7 s on the 2-core CPU) is paid
once. Its batches reach the training process through CUDA IPC: the memory is shared, not copied,
and the consumer's stream waits on the event recorded when the child shared it (shared memory on
the CPU). The steps then share no GIL and no host lock with the input. At stop 19 on an H200 the
GPU sat idle 34 ms of each 73 ms batch while the input ran in threads of the training process.

The child makes the same batches as the threads would, in the same order: each stage's loader and
augmentation generator are new there as they are in the stage, and it seeds them and its sampler
with the ``EpochSeeds`` the stage sends.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import pickle
import queue
import threading
import time
import weakref
from dataclasses import dataclass, field
from functools import partial
from multiprocessing.reduction import ForkingPickler
from typing import Any, Callable, Generator, Iterator

import torch
from torch.utils.data import DataLoader, DistributedSampler

from clfpipe.contract.augment import AugmentPolicy
from clfpipe.contract.dataset import Split
from clfpipe.contract.errors import ClfpipeError
from clfpipe.contract.preprocess import PreprocessSpec
from clfpipe.train.data import Augment, DecodedCache, DeviceBatches, encoded_loader, stop_workers

log = logging.getLogger(__name__)

AHEAD = 2  # batches the child may have made and shared before the steps take them
POLL_S = 1.0  # how often a waiting side checks that the other is still there
STOP_S = 30.0  # how long close waits for the child to end by itself


@dataclass(frozen=True)
class EpochSeeds:
    """What makes an epoch's batches: the loader's shuffle, the augmentation's draws, the shard."""

    loader: int
    augment: int
    sampler_epoch: int


def apply_seeds(seeds: EpochSeeds, loader: torch.Generator, augment: torch.Generator,
                sampler: DistributedSampler | None) -> None:
    loader.manual_seed(seeds.loader)
    augment.manual_seed(seeds.augment)
    if sampler is not None:
        sampler.set_epoch(seeds.sampler_epoch)


@dataclass(frozen=True)
class InputPlan:
    """What the child needs to make one stage's training batches (it crosses by pickle); the
    device and the decoded-image cache are the run's (``InputProcess``)."""

    split: Split
    spec: PreprocessSpec
    policy: AugmentPolicy
    batch_size: int
    workers: int
    seed: int  # the loader's generator before the first EpochSeeds
    channels_last: bool
    sampler: DistributedSampler | None = None  # this rank's shard
    # How the loader's workers start: as the stage's own would (fork on Linux before Python 3.14).
    # The child is spawned, and its own default is spawn: each worker imported torch again, 2.7 s
    # a stage on the 2-core CPU.
    start_method: str = field(default_factory=lambda: multiprocessing.get_start_method(allow_none=True)
                              or multiprocessing.get_all_start_methods()[0])  # the first is the default

    def loader(self) -> DataLoader:
        return encoded_loader(self.split, self.batch_size, self.workers, self.seed, sampler=self.sampler,
                              start_method=self.start_method)


@dataclass(frozen=True)
class _End:
    """The child's last item of a pass over the loader (whole, stopped early, or failed)."""

    decoded: int  # images the pass decoded (the others were in the cache)


@dataclass(frozen=True)
class _Pass:
    """The parent's command for one pass: with the stage's plan when the child has another one."""

    plan: InputPlan | None
    seeds: EpochSeeds | None


class _Release:
    """The parent's word that the stage whose plan the child has is over: its loader workers stop."""


class _Stop:
    """The parent's command to end the child."""


class _Gone:
    """The child's last item, after _Stop: nothing it shared comes after it."""


@dataclass
class _Failed:
    error: BaseException


class InputProcessError(ClfpipeError):
    """The input process ended while the stage still needed it (killed, out of memory)."""


class InputProcess:
    """A run's training input in a spawned child: ``batches(plan)`` is a stage's view of it. The
    child starts with the first pass and keeps one ``DecodedCache`` (``cache_bytes`` on ``device``)
    for every stage; ``close`` ends it, and so does the garbage collector; the child ends itself
    when its parent is gone."""

    def __init__(self, device: torch.device, cache_bytes: int) -> None:
        self.device, self.cache_bytes = device, cache_bytes
        self._child: Any = None
        self._holder: ProcessBatches | None = None  # the stage whose plan the child has
        self._releaser: _Releaser | None = None
        self._passing = False  # a pass is under way: its batches come next on the one queue

    def batches(self, plan: InputPlan) -> ProcessBatches:
        return ProcessBatches(self, plan)

    @property
    def pid(self) -> int | None:
        return None if self._child is None else self._child.pid

    def _start(self) -> None:
        context = torch.multiprocessing.get_context("spawn")  # CUDA cannot be used in a forked child
        self._commands, self._out, self._cancel = context.Queue(), context.Queue(maxsize=AHEAD), context.Event()
        taken_back = context.Event()  # the parent has everything the child put before _Gone, and let it go
        # not a daemon: its loaders have worker processes of their own
        child = context.Process(target=_serve, args=(str(self.device), self.cache_bytes, self._commands, self._out,
                                                     self._cancel, taken_back), name="clfpipe-input")
        child.start()
        self._child = child
        self._finalizer = weakref.finalize(self, _stop, child, self._commands, self._out, self._cancel, taken_back)
        if self.device.type == "cuda":
            self._releaser = _Releaser(self.device)
        log.debug("input process %d started", child.pid)

    def run_pass(self, batches: ProcessBatches, seeds: EpochSeeds | None) -> Generator[Any, None, int]:
        """One pass of `batches`' stage, its plan sent first if the child has another: yields the
        batches, returns how many images it decoded. Left early, it stops the child's pass."""
        self._begin(batches, seeds)
        ended = False
        try:
            while not isinstance(item := self._next(), _End):
                if isinstance(item, _Failed):
                    ended = isinstance(self._next(), _End)  # the child ends every pass with _End
                    raise item.error
                yield item
                if self._releaser is not None:  # the consumer asks for the next: this one's work is queued
                    self._releaser.let_go(item)
                del item  # the releaser's reference is the last
            ended = True
            return item.decoded
        finally:
            if not ended:
                self._abandon()
            self._passing = False

    def _begin(self, batches: ProcessBatches, seeds: EpochSeeds | None) -> None:
        if self._passing:
            raise RuntimeError("the input process makes one pass at a time: expected the last pass ended or closed, got another")
        if self._child is None:
            self._start()
        plan = None if self._holder is batches else batches.plan
        self._holder, self._passing = batches, True
        self._commands.put(_Pass(plan, seeds))

    def _next(self) -> Any:
        while True:
            try:
                data = self._out.get(timeout=POLL_S)
            except queue.Empty:
                if not self._child.is_alive():
                    raise self._ended_error() from None
                continue
            try:
                return ForkingPickler.loads(data)  # as _Outbox.put pickled it
            except Exception:  # a batch's memory is fetched from the child (its file descriptor, its CUDA handle)
                self._child.join(timeout=POLL_S)
                if self._child.is_alive():
                    raise
                raise self._ended_error() from None

    def _ended_error(self) -> InputProcessError:
        return InputProcessError(f"the training input process ended (exit code {self._child.exitcode}; what it printed "
                                 "before it ended is on stderr)")

    def _abandon(self) -> None:
        """Stop the child's pass and take what it had made, up to its _End: the next pass starts clean."""
        self._cancel.set()
        try:
            while not isinstance(self._next(), _End):
                pass
        except InputProcessError:
            pass  # nothing left to drain
        finally:
            self._cancel.clear()

    def release(self, batches: ProcessBatches) -> None:
        """`batches`' stage is over: the child stops its loader workers (its cache stays)."""
        if self._holder is batches:
            self._holder = None
            self._commands.put(_Release())

    def close(self) -> None:
        if self._releaser is not None:
            self._releaser.close()  # every batch let go while the child that made it still runs
        if self._child is not None:
            self._finalizer()


class ProcessBatches:
    """A stage's training batches made by its run's ``InputProcess`` from ``plan``, ready on the
    device: iterated like ``DeviceBatches``, one pass a call; ``seed`` sets the next pass's
    ``EpochSeeds`` (none: the generators go on where they were, as a second pass over the threads'
    loader does). A pass left early (lr_find) stops the child's pass before the next one starts.
    ``decoded``: the images the last whole pass decoded."""

    def __init__(self, process: InputProcess, plan: InputPlan) -> None:
        self.process, self.plan, self._length = process, plan, len(plan.loader())
        self._seeds: EpochSeeds | None = None
        self.decoded: int | None = None

    def __len__(self) -> int:
        return self._length

    def seed(self, seeds: EpochSeeds) -> None:
        self._seeds = seeds

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        seeds, self._seeds = self._seeds, None
        self.decoded = yield from self.process.run_pass(self, seeds)

    def close(self) -> None:
        self.process.release(self)


class _Releaser:
    """Lets go of the batches received through CUDA IPC off the training thread. The last reference
    to such a tensor synchronises the current stream of the thread that drops it (torch's IPC
    deleter, so that the child may reuse the memory), and that thread holds the GIL while it
    waits. Dropped by the training thread, every batch would wait for the GPU to finish its step
    and the host could not queue the next step ahead. Here a thread waits for an event recorded
    after the step's work, then drops the batch with an idle stream as its current one. A consumer
    must have queued a batch's work before it asks for the next (every training loop does)."""

    def __init__(self, device: torch.device) -> None:
        self.idle = torch.cuda.Stream(device)
        self.pending: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name="clfpipe-release", daemon=True)
        self.thread.start()

    def let_go(self, item: Any) -> None:
        done = torch.cuda.Event()
        done.record()  # on the consumer's stream, after the work it queued with the batch
        self.pending.put((item, done))

    def _run(self) -> None:
        while (entry := self.pending.get()) is not None:
            entry[1].synchronize()  # without the GIL
            with torch.cuda.stream(self.idle):
                del entry  # the deleter's synchronisation is the idle stream's: at once

    def close(self) -> None:
        self.pending.put(None)
        self.thread.join()


def _stop(child: Any, commands: Any, out: Any, cancel: Any, taken_back: Any) -> None:
    """End the child: its pass stopped, told to go, and everything it put taken back (a pass ends
    with _End, which must fit in the queue) up to its _Gone; killed if it has not gone within STOP_S."""
    cancel.set()
    commands.put(_Stop())
    deadline, taken = time.monotonic() + STOP_S, 0
    while child.is_alive() and time.monotonic() < deadline:
        with contextlib.suppress(queue.Empty):
            if isinstance(_let_go(out.get(timeout=POLL_S / 10)), _Gone):
                taken_back.set()
            else:
                taken += 1
    log.debug("input process %d: %d items taken back at its end%s", child.pid, taken,
              "" if taken_back.is_set() else " (it did not say it was going)")
    if child.is_alive():
        log.warning("the input process %d did not end within %.0f s: killed", child.pid, STOP_S)
        child.kill()
    child.join()


def _let_go(data: bytes) -> Any:
    """An item the child put, taken and let go at once (a batch's memory released, so the child can
    free it: one never taken stays counted as held), for what it was; None where it does not load."""
    try:
        return ForkingPickler.loads(data)
    except Exception:  # noqa: BLE001 - a batch whose memory cannot be fetched any more holds none of ours
        return None


def _serve(device_name: str, cache_bytes: int, commands: Any, out: Any, cancel: Any, taken_back: Any) -> None:
    """In the child: for each _Pass, one pass over its stage's loader, each batch put on ``out``
    ready on the device, then _End; a stage's loader and augmentation are made when its plan
    comes, one cache serves them all; until _Stop or the parent is gone (then ``_leave``)."""
    out.cancel_join_thread()  # at its end, what the parent no longer reads does not hold it
    device = torch.device(device_name)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # a rank's GPU (cuda:N), as its training process has set
    cache, outbox = DecodedCache(device, cache_bytes), _Outbox(out, cancel, os.getppid())
    stage: _ChildStage | None = None
    try:
        while not isinstance(command := _command(commands, outbox.parent), _Stop):
            if stage is not None and (isinstance(command, _Release) or command.plan is not None):
                stage.close()
                stage = None
            if isinstance(command, _Pass):
                stage = stage or _ChildStage.start(command.plan, device, cache)
                _one_pass(stage, command.seeds, outbox, cache)
    finally:
        if stage is not None:
            stage.close()
    _leave(outbox, taken_back, device)


def _leave(outbox: _Outbox, taken_back: Any, device: torch.device) -> None:
    """The child's end once told to go: _Gone put, then, once the parent has taken back and let go
    of everything before it, the memory of every batch shared freed while CUDA is still up. torch
    frees a shared block only when the producer collects (or at its interpreter's exit, which
    came after the driver had shut down: 'terminate called ... CUDA error: driver shutting down',
    on an H200 at stop 24)."""
    if outbox.put(_Gone(), cancellable=False):  # False: the parent is gone, and nothing it held matters
        taken_back.wait(timeout=STOP_S / 2)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.ipc_collect()


@dataclass(frozen=True)
class _ChildStage:
    """A stage's loader and input steps in the child, as ``StageData`` makes them: new generators."""

    loader: DataLoader
    batches: DeviceBatches
    reseed: Callable[[EpochSeeds], None]

    @classmethod
    def start(cls, plan: InputPlan, device: torch.device, cache: DecodedCache) -> _ChildStage:
        loader, augment_gen = plan.loader(), torch.Generator()
        cache.files = plan.split.files  # the run's training split, every stage's: names a file that does not decode
        augment = Augment(plan.spec, plan.policy, augment_gen, plan.channels_last)
        return cls(loader, DeviceBatches(loader, (cache, augment), device),
                   partial(apply_seeds, loader=loader.generator, augment=augment_gen, sampler=plan.sampler))

    def close(self) -> None:
        """Stop the stage's loader workers (the cache is the child's, not the stage's)."""
        stop_workers(self.loader)


def _one_pass(stage: _ChildStage, seeds: EpochSeeds | None, outbox: _Outbox, cache: DecodedCache) -> None:
    if seeds is not None:
        stage.reseed(seeds)
    decoded = cache.decoded
    try:
        with contextlib.closing(iter(stage.batches)) as epoch:
            for batch in epoch:
                if not outbox.put(batch):
                    break
                del batch
                if cache.device.type == "cuda":
                    torch.cuda.ipc_collect()  # free what the parent has released
    except Exception as exc:  # noqa: BLE001 - raised again in the parent
        outbox.put(_Failed(_picklable(exc)))
    outbox.put(_End(cache.decoded - decoded), cancellable=False)


@dataclass(frozen=True)
class _Outbox:
    """The child's side of the batch queue: a put gives up once the pass is cancelled or the
    parent is gone."""

    out: Any
    cancel: Any
    parent: int

    def put(self, item: Any, cancellable: bool = True) -> bool:
        # Pickled here, not by the queue's feeder thread: that thread only prints what fails to
        # pickle (a CUDA tensor that cannot be shared) and drops it, and the parent would wait on
        # for a batch that never comes. The IPC event is recorded here too, after the batch is made.
        data = bytes(ForkingPickler.dumps(item))
        while not (cancellable and self.cancel.is_set()) and os.getppid() == self.parent:
            with contextlib.suppress(queue.Full):
                self.out.put(data, timeout=POLL_S / 10)
                return True
        return False


def _command(commands: Any, parent: int) -> Any:
    while True:
        try:
            return commands.get(timeout=POLL_S)
        except queue.Empty:
            if os.getppid() != parent:  # the parent is gone: nobody will read what is made
                return _Stop()


def _picklable(exc: Exception) -> Exception:
    """The error itself where it pickles (a DataError), else its type and text."""
    try:
        pickle.dumps(exc)
        return exc
    except Exception:  # noqa: BLE001 - any failure to pickle
        return RuntimeError(f"in the training input process: {type(exc).__name__}: {exc}")
