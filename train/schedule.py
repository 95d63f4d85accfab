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


def multiplier(schedule: str, step: int, steps_per_epoch: int, epochs: int, cycle_len: int = 1, cycle_mult: int = 1,
               warmup: float = 0.0) -> float:
    """Dispatch on the recipe's schedule name; warmup is the fraction of the first cycle at lr/100."""
    total = steps_per_epoch * epochs
    if schedule == "constant":
        value = 1.0
    elif schedule == "cosine":
        value = cosine(step / total)
    elif schedule == "sgdr":
        value = sgdr(step, steps_per_epoch, epochs, cycle_len, cycle_mult)
    elif schedule == "onecycle":
        return one_cycle(step / total)  # has its own warm-up
    else:
        raise ValueError(f"expected schedule constant, cosine, sgdr or onecycle, got {schedule!r}")
    first_cycle = cycle_len * steps_per_epoch if schedule == "sgdr" else total
    return with_warmup(value, step, round(warmup * first_cycle))


def schedule_values(schedule: str, steps_per_epoch: int, epochs: int, cycle_len: int = 1, cycle_mult: int = 1,
                    warmup: float = 0.0) -> list[float]:
    """Every step's multiplier: for the PNG of the schedule that ran."""
    return [multiplier(schedule, s, steps_per_epoch, epochs, cycle_len, cycle_mult, warmup) for s in range(steps_per_epoch * epochs)]


def one_cycle(t: float, pct_start: float = 0.25, div: float = 25.0, final_div: float = 1e5) -> float:
    """fastai's one-cycle: cosine warm-up from 1/div to 1 over pct_start, then cosine to 1/final_div."""
    t = min(max(t, 0.0), 1.0)
    if t < pct_start:
        lo = 1.0 / div
        return lo + (1.0 - lo) * (1.0 - cosine(t / pct_start))
    hi, lo = 1.0, 1.0 / final_div
    return lo + (hi - lo) * cosine((t - pct_start) / (1.0 - pct_start))


def with_warmup(value: float, step: int, warmup_steps: int, factor: float = 0.01) -> float:
    """fastai 0.7's SGDR warm-up: lr/100 for the first warmup_steps steps, then the schedule."""
    return value * factor if step < warmup_steps else value
