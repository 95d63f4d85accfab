import math

import numpy as np
import pytest
import torch
from torch import nn

from clfpipe.contract.recipe import LrFindConfig
from clfpipe.train.lr_find import diverged, exp_lrs, lr_find, smooth_losses, suggest_minimum, suggest_steep, suggest_valley


def test_exponential_sweep_closed_form():
    lrs = exp_lrs(1e-5, 10.0, 100)
    assert lrs[0] == pytest.approx(1e-5)
    assert lrs[50] == pytest.approx(1e-5 * (1e6) ** 0.5)
    assert np.allclose(lrs[1:] / lrs[:-1], (1e6) ** 0.01)


def test_smoothing_is_debiased_ema():
    assert smooth_losses([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])  # debiasing removes the zero start
    a, b = 1.0, 3.0
    expected = (0.98 * 0.02 * a + 0.02 * b) / (1 - 0.98**2)
    assert smooth_losses([a, b])[1] == pytest.approx(expected)


def test_stop_rule():
    assert diverged(math.nan, 1.0, 2)
    assert not diverged(5.0, 1.0, 5)  # too early to judge
    assert diverged(4.1, 1.0, 11) and not diverged(3.9, 1.0, 11)


def test_suggestions_on_a_known_curve():
    lrs = exp_lrs(1e-5, 10.0, 60)
    x = np.log10(lrs)
    losses = 2.0 - 1.5 / (1 + np.exp(-(x + 2.5) * 3)) + np.where(x > -0.5, (x + 0.5) ** 2 * 3, 0)  # falls, then explodes
    steep, valley, minimum = suggest_steep(lrs, losses), suggest_valley(lrs, losses), suggest_minimum(lrs, losses)
    assert 10**-3 < steep < 10**-2  # steepest descent is around 10**-2.5
    assert 1e-4 < valley < 1.0
    assert minimum == pytest.approx(lrs[int(np.argmin(losses))] / 10)


def test_lr_find_on_a_small_problem_restores_weights_exactly():
    torch.manual_seed(0)
    x = torch.randn(256, 8)
    y = (x[:, 0] > 0).long()
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [(x[i : i + 32], y[i : i + 32]) for i in range(0, 256, 32)]
    result = lr_find(model, batches, lambda b: nn.functional.cross_entropy(model(b[0]), b[1]),
                     lambda: torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.9), config=LrFindConfig(num_it=100),
                     set_mode=model.train)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert set(result.suggestions) == {"valley", "steep", "minimum"}
    assert 1e-4 < result.suggestions["valley"] < 3.0
    assert len(result.lrs) < 100  # stopped when the loss blew up


def test_suggestions_stay_inside_the_swept_range():
    from clfpipe.train.lr_find import suggest

    lrs = exp_lrs(1e-5, 10.0, 30)
    rising = np.linspace(1.0, 3.0, 30)  # the best loss is at the very first step: minimum/10 would fall below it
    got = suggest(lrs, rising)
    assert got["minimum"] == pytest.approx(lrs[0]) and all(lrs[0] <= v <= lrs[-1] for v in got.values())
