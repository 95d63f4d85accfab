import math

import pytest

from clfpipe.contract.errors import RecipeError
from clfpipe.train.schedule import cosine, multiplier, sgdr, sgdr_cycles


def test_cosine_closed_form():
    assert cosine(0.0) == 1.0
    assert cosine(0.5) == pytest.approx(0.5)
    assert cosine(1.0) == pytest.approx(0.0, abs=1e-12)
    for t in (0.1, 0.3, 0.77):
        assert cosine(t) == pytest.approx((math.cos(math.pi * t) + 1) / 2)


def test_sgdr_cycle_lengths_1_2_4():
    assert sgdr_cycles(7, 1, 2) == [1, 2, 4]
    assert sgdr_cycles(3, 1, 1) == [1, 1, 1]
    with pytest.raises(RecipeError, match="whole number of SGDR cycles"):
        sgdr_cycles(5, 1, 2)


def test_sgdr_restarts_at_cycle_boundaries():
    spe = 10  # steps per epoch; cycles of 1, 2, 4 epochs start at steps 0, 10, 30
    for start in (0, 10, 30):
        assert sgdr(start, spe, 7, cycle_len=1, cycle_mult=2) == 1.0
    assert sgdr(5, spe, 7, cycle_len=1, cycle_mult=2) == pytest.approx(0.5)  # middle of the first cycle
    assert sgdr(20, spe, 7, cycle_len=1, cycle_mult=2) == pytest.approx(0.5)  # middle of the second (20 steps long)
    assert sgdr(50, spe, 7, cycle_len=1, cycle_mult=2) == pytest.approx(0.5)  # middle of the third (40 steps long)
    assert sgdr(29, spe, 7, cycle_len=1, cycle_mult=2) < 0.01


def test_multiplier_dispatch():
    assert multiplier("constant", 5, 10, 2) == 1.0
    assert multiplier("cosine", 10, 10, 2) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        multiplier("step", 0, 1, 1)


def test_one_cycle_endpoints_and_peak():
    from clfpipe.train.schedule import one_cycle

    assert one_cycle(0.0) == pytest.approx(1 / 25)
    assert one_cycle(0.25) == pytest.approx(1.0)
    assert one_cycle(1.0) == pytest.approx(1e-5)
    assert one_cycle(0.125) == pytest.approx(1 / 25 + (1 - 1 / 25) * 0.5)


def test_warmup_holds_lr_over_100_for_the_first_part_of_the_first_cycle():
    # sgdr 1+2 epochs of 10 steps, warm-up 1/20 of the first cycle = 0.5 -> round to 0 steps; use 0.2 -> 2 steps
    assert multiplier("sgdr", 0, 10, 3, cycle_len=1, cycle_mult=2, warmup=0.2) == pytest.approx(0.01)
    assert multiplier("sgdr", 1, 10, 3, cycle_len=1, cycle_mult=2, warmup=0.2) == pytest.approx(0.01 * sgdr(1, 10, 3, cycle_len=1, cycle_mult=2))
    assert multiplier("sgdr", 2, 10, 3, cycle_len=1, cycle_mult=2, warmup=0.2) == pytest.approx(sgdr(2, 10, 3, cycle_len=1, cycle_mult=2))
    assert multiplier("sgdr", 10, 10, 3, cycle_len=1, cycle_mult=2, warmup=0.2) == 1.0  # the restart is not warmed up again
