"""Training until over-fitting: the lesson's "train full network with cycle_mult=2 until over-fitting".

A stage with ``until = "overfit"`` compares the ends of its SGDR cycles, where the learning rate
has annealed to its lowest and the weights are a finished model (fastai 0.7 saved a snapshot
there, ``cycle_save_name``). The first cycle end that improves on neither the best metric nor the
lowest validation loss of the ends before it is over-fitting: the stage ends there, with the
weights of the best cycle end. Either figure alone misleads: early in training from scratch the
metric wobbles at chance while the loss falls (the demo's unfreeze stage on 10 images a class
stopped at its second cycle end on the metric alone, still learning), and a model whose loss
rises as it grows over-confident may still be getting more images right. Pure functions: the loop
keeps the state.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

from clfpipe.contract.recipe import StageConfig, check_sgdr


@dataclass(frozen=True)
class CycleEnd:
    """The validation figures at the end of a cycle."""

    epoch: int  # the stage's epochs done at the cycle's end
    metric: float  # accuracy, or F2 for multi-label: higher is better
    valid_loss: float

    @property
    def finite(self) -> bool:
        """False for a diverged (nan) end."""
        return math.isfinite(self.metric) and math.isfinite(self.valid_loss)


def cycle_ends(stage: StageConfig) -> frozenset[int]:
    """The epochs (counted from 1) at which a watched stage's cycles end; none for any other stage."""
    if stage.until != "overfit":
        return frozenset()
    return frozenset(itertools.accumulate(check_sgdr(stage.name, stage.epochs, stage.cycle_len, stage.cycle_mult)))


def better(end: CycleEnd, best: CycleEnd | None) -> bool:
    """Whether `end` beats the best cycle end so far: a higher metric, or the same metric at a lower
    valid loss. The metric comes first because it is what the run reports; the loss breaks ties,
    which a small validation set's accuracy often makes. A diverged (nan) cycle end is never better."""
    if not end.finite:
        return False
    if best is None:
        return True
    return end.metric > best.metric or (end.metric == best.metric and end.valid_loss < best.valid_loss)


def improves(end: CycleEnd, best: CycleEnd | None, lowest_loss: float) -> bool:
    """Whether `end` still improves: a metric above the best cycle end's, or a validation loss below
    the lowest of the cycle ends before it. One that does neither is over-fitting, as is one that
    diverged (nan) after a best; the first cycle end has nothing to be compared with (nor restored)."""
    if best is None:
        return True
    return end.finite and (end.metric > best.metric or end.valid_loss < lowest_loss)
