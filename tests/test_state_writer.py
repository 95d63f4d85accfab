"""The training state written in the background: what was saved is what the file holds."""

import contextlib
import threading

import pytest
import torch

from clfpipe.contract.errors import ManifestError
from clfpipe.train.state import STATE_FILE, EpochMetrics, StateWriter, TrainState


def _state(weight: torch.Tensor) -> TrainState:
    state = TrainState(data_dir="/data", stage=1, epoch=2, lrs=[1e-3])
    state.rows.append(EpochMetrics(0, "a", 1, {"head": 1e-3}, 0.9, 0.8, 0.5, 1.0))
    state.model = {"w": weight}
    state.optimizer = {"state": {0: {"exp_avg": weight * 2}}, "param_groups": [{"lr": 1e-3, "params": [0]}]}
    return state


def test_a_save_holds_the_state_as_it_was_when_saved(tmp_path, monkeypatch):
    gate = threading.Event()  # the write starts only after the training has moved on
    write = StateWriter._write
    monkeypatch.setattr(StateWriter, "_write", lambda self, snapshot: (gate.wait(10), write(self, snapshot)))
    weight = torch.arange(6.0)
    state = _state(weight)
    with contextlib.closing(StateWriter(tmp_path)) as writer:
        writer.save(state)
        weight.add_(100)  # the next epoch trains on, in place
        state.rows.append(EpochMetrics(0, "a", 2, {"head": 1e-3}, 0.7, 0.6, 0.6, 1.0))
        state.epoch = 3
        gate.set()
    saved = TrainState.load(tmp_path)
    assert saved.epoch == 2 and len(saved.rows) == 1 and saved.rows[0].train_loss == 0.9
    assert torch.equal(saved.model["w"], torch.arange(6.0))
    assert torch.equal(saved.optimizer["state"][0]["exp_avg"], torch.arange(6.0) * 2)


def test_saves_land_in_order_and_the_last_one_stays(tmp_path):
    writer = StateWriter(tmp_path)
    for epoch in range(1, 4):
        state = _state(torch.full((3,), float(epoch)))
        state.epoch = epoch
        writer.save(state)
    writer.close()
    assert TrainState.load(tmp_path).epoch == 3
    assert not [p for p in tmp_path.iterdir() if p.name != STATE_FILE]  # no temporary file left


def test_a_failed_write_is_raised_in_the_training_thread(tmp_path):
    blocker = tmp_path / "run"
    blocker.write_text("a file where the run directory should be")
    writer = StateWriter(blocker)
    writer.save(_state(torch.zeros(2)))
    with pytest.raises(ManifestError, match="cannot write"):
        writer.wait()
    writer.close()  # reported once
