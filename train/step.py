"""One optimizer step on a batch already on the device: eager, or replayed from a CUDA graph.

Eager, a resnet34 step is some five hundred torch calls from Python, and each gives up the GIL and
takes it back. Beside the prefetch threads (decode, augmentation: Python too) every take-back can
wait out the interpreter's switch interval: on an H200 a thread running only Python held the steps
to 56 img/s against 8,791 alone (``benchmarks/train_throughput.py``, step_beside_python_img_s).
``GraphedStep`` captures forward, loss and backward once as a CUDA graph (torch's "whole network
capture", without the optimizer step, as its notes advise where the step is not capture-safe) and
replays it: a handful of calls a step, whatever the model. The optimizer step stays eager (fused:
one kernel a parameter group), so the schedule sets the learning rates as plain floats as before.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

from clfpipe.contract.errors import first_line

log = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor]
LossFn = Callable[[Batch], torch.Tensor]

WARMUP_STEPS = 3  # eager steps before the capture, on a side stream (torch's CUDA graph notes: lazy init, cuDNN's choices)


class EagerStep:
    """Forward, loss, backward and the optimizer's step, call by call; returns the (detached) loss.
    ``set_to_none=False`` zeroes the gradients in place (tensors a CUDA graph writes)."""

    graphed = False

    def __init__(self, loss: LossFn, optimizer: torch.optim.Optimizer, set_to_none: bool = True) -> None:
        self.loss, self.optimizer, self.set_to_none = loss, optimizer, set_to_none

    def __call__(self, batch: Batch) -> torch.Tensor:
        loss = self.loss(batch)
        self.optimizer.zero_grad(set_to_none=self.set_to_none)
        loss.backward()
        self.optimizer.step()
        return loss.detach()


class GraphedStep:
    """The same step with forward, loss and backward replayed from one CUDA graph, captured on the
    ``WARMUP_STEPS + 1``-th call (the warm-up calls are real steps, run eagerly on a side stream).
    The graph owns the inputs it reads (each batch is copied into them), the loss and every
    gradient: it writes them afresh each replay, so nothing sets the gradients to None again. A
    batch of another shape than the captured one (a short last batch) runs eagerly, accumulating
    into the same gradient tensors after zeroing them in place. Where the capture fails the step
    says why, once, and stays eager (``graphed`` is False). One graph per stage: what trains, the
    modules' train/eval modes and the input size are fixed within one, as the capture needs."""

    def __init__(self, loss: LossFn, optimizer: torch.optim.Optimizer, device: torch.device,
                 warmup: int = WARMUP_STEPS) -> None:
        self.loss, self.optimizer, self.device, self.warmup = loss, optimizer, device, warmup
        self._eager_fresh = EagerStep(loss, optimizer)  # before the capture, or where it failed
        self._eager_in_place = EagerStep(loss, optimizer, set_to_none=False)  # beside the graph
        self.graph: torch.cuda.CUDAGraph | None = None
        self.failed = False
        self.calls = 0
        self._x = self._y = self._loss = None

    @property
    def graphed(self) -> bool:
        return self.graph is not None

    def __call__(self, batch: Batch) -> torch.Tensor:
        self.calls += 1
        if self.graph is None and not self.failed:
            if self.calls <= self.warmup:
                return self._on_side_stream(batch)
            self._capture(batch)
        if self.graph is None:
            return self._eager_fresh(batch)
        if not self._fits(batch):
            return self._eager_in_place(batch)
        x, y = batch
        self._x.copy_(x)
        self._y.copy_(y)
        self.graph.replay()
        self.optimizer.step()
        return self._loss.detach().clone()  # the graph's loss is overwritten by the next replay

    def _fits(self, batch: Batch) -> bool:
        return all(a.shape == b.shape and a.dtype == b.dtype for a, b in zip(batch, (self._x, self._y)))

    def _on_side_stream(self, batch: Batch) -> torch.Tensor:
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            loss = self._eager_fresh(batch)
        current.wait_stream(side)
        return loss

    def _capture(self, batch: Batch) -> None:
        """Record forward, loss and backward on static copies of this batch's tensors (the capture
        runs nothing: the replay after it makes this step)."""
        self._x, self._y = (torch.empty_like(t) for t in batch)
        self.optimizer.zero_grad(set_to_none=True)  # backward in the capture allocates them from the graph's pool
        graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: the prefetch threads' decode and copies on their own streams go on during the capture
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                loss = self.loss((self._x, self._y))
                loss.backward()
        except RuntimeError as exc:
            self.failed = True
            self.optimizer.zero_grad(set_to_none=True)
            log.warning("the training step could not be captured as a CUDA graph (%s): it runs eagerly",
                        first_line(exc))
            return
        self.graph, self._loss = graph, loss
        log.info("training step captured as a CUDA graph (batch %s) after %d eager steps", tuple(self._x.shape), self.warmup)


TrainStep = EagerStep | GraphedStep


def train_step(loss: LossFn, optimizer: torch.optim.Optimizer, device: torch.device, *,
               cuda_graphs: bool) -> TrainStep:
    """The stage's step: graphed where asked for and possible (CUDA), else eager."""
    if cuda_graphs and device.type == "cuda":
        return GraphedStep(loss, optimizer, device)
    return EagerStep(loss, optimizer)
