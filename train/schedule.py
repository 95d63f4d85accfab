"""Learning-rate schedules as pure functions, composed the way fastai's ``combine_scheds`` does.

A schedule maps the position in a stage (0 at its first step, 1 at its end) to a multiplier of the
stage's peak learning rates. Positions are exact fractions (step / total steps), so cycle
boundaries land exactly on their first step.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Callable, Sequence

from clfpipe.contract.recipe import StageConfig, check_sgdr

Sched = Callable[[Fraction], float]


def cosine(t: float) -> float:
    """Cosine annealing from 1 at t=0 to 0 at t=1: (cos(pi t) + 1) / 2."""
    t = min(max(float(t), 0.0), 1.0)
    return 0.5 * (math.cos(math.pi * t) + 1.0)


def sched_cos(start: float, end: float) -> Sched:
    """fastai's sched_cos: cosine from start to end."""
    return lambda pos: end + (start - end) * cosine(pos)


def sched_const(value: float) -> Sched:
    return lambda pos: value


def combine_scheds(spans: Sequence[int | Fraction], scheds: Sequence[Sched]) -> Sched:
    """Run scheds[i] over a share of the stage proportional to spans[i], each on its own 0..1."""
    total = Fraction(sum(spans))
    bounds, start = [], Fraction(0)
    for span in spans:
        bounds.append((start, start + Fraction(span) / total))
        start += Fraction(span) / total

    def combined(pos: Fraction) -> float:
        pos = min(max(Fraction(pos), Fraction(0)), Fraction(1))
        for (lo, hi), sched in zip(bounds, scheds):
            if pos < hi or hi == 1:
                return sched((pos - lo) / (hi - lo))
        raise AssertionError("unreachable: the last span ends at 1")

    return combined


def sgdr_cycles(epochs: int, cycle_len: int, cycle_mult: int) -> list[int]:
    """Cycle lengths in epochs: cycle_len, cycle_len*mult, ... summing exactly to epochs."""
    return check_sgdr("sgdr", epochs, cycle_len, cycle_mult)


def sched_sgdr(epochs: int, cycle_len: int, cycle_mult: int) -> Sched:
    """Cosine annealing with warm restarts; each cycle cycle_mult times longer than the last."""
    cycles = sgdr_cycles(epochs, cycle_len, cycle_mult)
    return combine_scheds(cycles, [sched_cos(1.0, 0.0)] * len(cycles))


def sched_one_cycle(pct_start: float = 0.25, div: float = 25.0, final_div: float = 1e5) -> Sched:
    """fastai's one-cycle: cosine warm-up from 1/div to 1 over pct_start, then cosine to 1/final_div."""
    start = Fraction(pct_start).limit_denominator(1000)
    return combine_scheds([start, 1 - start], [sched_cos(1.0 / div, 1.0), sched_cos(1.0, 1.0 / final_div)])


SCHEDULES: dict[str, Callable[[StageConfig], Sched]] = {
    "constant": lambda stage: sched_const(1.0),
    "cosine": lambda stage: sched_cos(1.0, 0.0),
    "sgdr": lambda stage: sched_sgdr(stage.epochs, stage.cycle_len, stage.cycle_mult),
    "onecycle": lambda stage: sched_one_cycle(),  # has its own warm-up
}


def warmup_steps(stage: StageConfig, steps_per_epoch: int) -> int:
    """fastai 0.7's SGDR warm-up: the first `warmup` fraction of the first cycle runs at lr/100."""
    if stage.schedule == "onecycle":
        return 0
    first_cycle = stage.cycle_len if stage.schedule == "sgdr" else stage.epochs
    return round(stage.warmup * first_cycle * steps_per_epoch)


def stage_multipliers(stage: StageConfig, steps_per_epoch: int) -> list[float]:
    """Every step's multiplier for a stage: what runs, and what schedule.png draws. The schedule's
    shape at step / total steps, at lr/100 during the warm-up steps."""
    sched, total = SCHEDULES[stage.schedule](stage), steps_per_epoch * stage.epochs
    warm = warmup_steps(stage, steps_per_epoch)
    return [sched(Fraction(step, total)) * (0.01 if step < warm else 1.0) for step in range(total)]


def multiplier(schedule: str, step: int, steps_per_epoch: int, epochs: int, *, cycle_len: int = 1, cycle_mult: int = 1,
               warmup: float = 0.0) -> float:
    """One step's multiplier (a stage given by its schedule fields)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"expected schedule {', '.join(SCHEDULES)}, got {schedule!r}")
    stage = StageConfig(schedule=schedule, epochs=epochs, cycle_len=cycle_len, cycle_mult=cycle_mult, warmup=warmup)
    return stage_multipliers(stage, steps_per_epoch)[step]


def sgdr(step: int, steps_per_epoch: int, epochs: int, *, cycle_len: int, cycle_mult: int) -> float:
    return multiplier("sgdr", step, steps_per_epoch, epochs, cycle_len=cycle_len, cycle_mult=cycle_mult)


def one_cycle(t: float) -> float:
    return sched_one_cycle()(Fraction(t).limit_denominator(10**9))
