"""The training state: where a run stands in its recipe, saved atomically after every epoch so that
``clfpipe train --resume`` continues a killed run with the same schedule; ``StateWriter`` writes
it in the background while the next epoch trains."""

from __future__ import annotations

import dataclasses
import io
import math
import pickle
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from clfpipe.contract.errors import ManifestError, first_line
from clfpipe.contract.manifest import atomic_write_bytes

STATE_FILE = "train_state.pt"


@dataclass(frozen=True)
class EpochMetrics:
    """One row of metrics.csv."""

    stage_index: int  # counted from 0, as in --set stages.N
    stage: str
    epoch: int
    lrs: dict[str, float]  # layer group -> its lr at the epoch's last step (trainable groups only)
    train_loss: float
    valid_loss: float
    metric: float  # accuracy, or F2 for multi-label
    seconds: float


@dataclass(frozen=True)
class StageDone:
    lrs: list[float]  # peak lr per trainable layer group, after lr_find
    steps: int  # steps per epoch
    epochs: int | None = None  # epochs run: fewer than the stage's where it stopped at over-fitting (None: all)
    kept: int | None = None  # where it stopped so: the epoch whose weights ended the stage


@dataclass
class TrainState:
    """Mutable on purpose: the loop advances it epoch by epoch and saves it after each one (``StateWriter``)."""

    data_dir: str
    stage: int = 0  # index of the stage in progress
    epoch: int = 0  # epochs of that stage done
    lrs: list[float] | None = None  # that stage's peak lrs, once chosen (lr_find may move them)
    rows: list[EpochMetrics] = field(default_factory=list)
    stages_done: list[StageDone] = field(default_factory=list)
    lr_finds: list[dict[str, Any]] = field(default_factory=list)
    sessions: list[dict[str, Any]] = field(default_factory=list)  # one per start or resume
    model: dict[str, torch.Tensor] | None = None
    optimizer: dict[str, Any] | None = None
    # until = "overfit": the stage's best cycle end so far ({"end": CycleEnd's fields, "model": its
    # weights on the host}), the lowest validation loss of its cycle ends, and whether the stage has
    # stopped (a resume then runs none of its epochs)
    best: dict[str, Any] | None = None
    lowest_loss: float = math.inf
    ended: bool = False

    def next_stage(self) -> None:
        self.stage, self.epoch, self.lrs = self.stage + 1, 0, None
        self.best, self.lowest_loss, self.ended = None, math.inf, False

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["rows"] = [asdict(r) for r in self.rows]
        data["stages_done"] = [asdict(s) for s in self.stages_done]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainState":
        known = {f.name for f in dataclasses.fields(cls)}
        state = cls(**{k: v for k, v in data.items() if k in known})
        state.rows = [EpochMetrics(**r) for r in state.rows]
        state.stages_done = [StageDone(**s) for s in state.stages_done]
        return state

    @classmethod
    def load(cls, run_dir: Path) -> "TrainState":
        path = run_dir / STATE_FILE
        if not path.is_file():
            raise ManifestError(f"{run_dir} has no {STATE_FILE}: expected a run that was interrupted after its first epoch")
        try:
            return cls.from_dict(torch.load(path, map_location="cpu", weights_only=True))
        except pickle.UnpicklingError as exc:  # torch's first line would advise weights_only=False: not for a foreign file
            raise ManifestError(f"{path}: unreadable training state (not one clfpipe wrote: torch's weights-only "
                                "loader refuses what it holds)") from exc
        except Exception as exc:  # torn: torch's messages run on in paragraphs
            raise ManifestError(f"{path}: unreadable training state ({first_line(exc)})") from exc


def torch_bytes(value: Any) -> bytes:
    """``torch.save`` of value, as bytes (for ``atomic_write_bytes``)."""
    buf = io.BytesIO()
    torch.save(value, buf)
    return buf.getvalue()


def to_host(value: Any) -> Any:
    """A copy of a nested state (dicts, lists, tensors) with every tensor copied to the host: what
    the training changes next cannot reach it."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: to_host(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_host(v) for v in value)
    return value


class StateWriter:
    """``TrainState.save`` without holding up the next epoch: the state is copied to the host when
    ``save`` is called, then serialised and written atomically by a background thread, one save at
    a time (the next waits for the one before). Writing resnet34's weights and AdamW moments
    (~260 MB) took ~1 s an epoch on the development CPU, 10 s of a 125 s run. A kill during a
    write leaves the previous epoch's file, from which a resume repeats that epoch. ``wait``
    (and ``close``) raise the write's error."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def save(self, state: TrainState) -> None:
        self.wait()
        snapshot = to_host(state.to_dict())
        self._thread = threading.Thread(target=self._write, args=(snapshot,), name="clfpipe-state-writer")
        self._thread.start()

    def _write(self, snapshot: dict[str, Any]) -> None:
        try:
            atomic_write_bytes(self.run_dir / STATE_FILE, torch_bytes(snapshot))  # a kill never leaves a torn file
        except BaseException as exc:  # noqa: BLE001 - raised again by wait() in the training thread
            self._error = exc

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def close(self) -> None:
        self.wait()
