"""Learning-rate schedules as pure functions of the step (fastai's sched_cos and SGDR).

Each returns a multiplier in [0, 1] of the stage's peak learning rates.
"""

from __future__ import annotations

import math


def cosine(t: float) -> float:
    """Cosine annealing from 1 at t=0 to 0 at t=1: (cos(pi t) + 1) / 2."""
    t = min(max(t, 0.0), 1.0)
    return 0.5 * (math.cos(math.pi * t) + 1.0)


def sgdr_cycles(epochs: int, cycle_len: int, cycle_mult: int) -> list[int]:
    """Cycle lengths in epochs: cycle_len, cycle_len*mult, ... summing exactly to epochs."""
    cycles, length, total = [], cycle_len, 0
    while total < epochs:
        cycles.append(length)
        total += length
        length *= cycle_mult
    if total != epochs:
        raise ValueError(
            f"expected epochs to be a whole number of SGDR cycles {cycles[:-1]} + ..., "
            f"got epochs={epochs} with cycle_len={cycle_len}, cycle_mult={cycle_mult}"
        )
    return cycles


def sgdr(step: int, steps_per_epoch: int, epochs: int, cycle_len: int, cycle_mult: int) -> float:
    """Cosine annealing per batch with warm restarts; T grows by cycle_mult after each cycle."""
    start = 0
    for length in sgdr_cycles(epochs, cycle_len, cycle_mult):
        span = length * steps_per_epoch
        if step < start + span:
            return cosine((step - start) / span)
        start += span
    return cosine(1.0)


def multiplier(schedule: str, step: int, steps_per_epoch: int, epochs: int, cycle_len: int = 1, cycle_mult: int = 1) -> float:
    """Dispatch on the recipe's schedule name."""
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        return cosine(step / (steps_per_epoch * epochs))
    if schedule == "sgdr":
        return sgdr(step, steps_per_epoch, epochs, cycle_len, cycle_mult)
    raise ValueError(f"expected schedule constant, cosine or sgdr, got {schedule!r}")
