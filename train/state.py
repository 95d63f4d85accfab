"""The training state: where a run stands in its recipe, saved atomically after every epoch so that
``clfpipe train --resume`` continues a killed run with the same schedule."""

from __future__ import annotations

import dataclasses
import io
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from clfpipe.contract.errors import ManifestError
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


@dataclass
class TrainState:
    """Mutable on purpose: the loop advances it epoch by epoch and saves it after each one."""

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

    def next_stage(self) -> None:
        self.stage, self.epoch, self.lrs = self.stage + 1, 0, None

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

    def save(self, run_dir: Path) -> None:
        buf = io.BytesIO()
        torch.save(self.to_dict(), buf)
        atomic_write_bytes(run_dir / STATE_FILE, buf.getvalue())  # a kill never leaves a torn file

    @classmethod
    def load(cls, run_dir: Path) -> "TrainState":
        path = run_dir / STATE_FILE
        if not path.is_file():
            raise ManifestError(f"{run_dir} has no {STATE_FILE}: expected a run that was interrupted after its first epoch")
        try:
            return cls.from_dict(torch.load(path, map_location="cpu", weights_only=True))
        except Exception as exc:  # torn or foreign file
            raise ManifestError(f"{path}: unreadable training state ({exc})") from exc
