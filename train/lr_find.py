"""lr_find: an exponential learning-rate sweep with an EMA-smoothed loss (fastai), weights restored.

Pure functions (the sweep's lrs, the smoothing, the stop rule, the suggestions) are separate from
the loop that runs batches, so each is tested against its closed form.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from torch import nn

from clfpipe.contract.recipe import LrFindConfig


def exp_lrs(start: float, end: float, n: int) -> np.ndarray:
    """lr_i = start * (end/start) ** (i/n), i = 0..n-1."""
    return start * (end / start) ** (np.arange(n) / n)


def smooth_losses(losses: Iterable[float], beta: float = 0.98) -> list[float]:
    """EMA with momentum beta, debiased by 1 - beta**i (i from 1)."""
    avg, out = 0.0, []
    for i, loss in enumerate(losses, start=1):
        avg = beta * avg + (1 - beta) * loss
        out.append(avg / (1 - beta**i))
    return out


def diverged(smoothed: float, best: float, iteration: int, skip: int = 10) -> bool:
    """Stop when the smoothed loss is NaN, or above 4x the best once past the first few steps."""
    return math.isnan(smoothed) or (iteration > skip and smoothed > 4 * best)


def suggest_valley(lrs: np.ndarray, losses: np.ndarray) -> float:
    """fastai v2's default: the middle of the longest descending stretch of the loss."""
    n = len(losses)
    lds, max_start, max_end = [1] * n, 0, 0
    for i in range(1, n):
        for j in range(i):
            if losses[i] < losses[j] and lds[i] < lds[j] + 1:
                lds[i] = lds[j] + 1
            if lds[max_end] < lds[i]:
                max_end, max_start = i, i - lds[i]
    sections = (max_end - max_start) / 3
    return float(lrs[max_start + int(sections) + int(sections / 2)])


def suggest_minimum(lrs: np.ndarray, losses: np.ndarray) -> float:
    """The lr at the minimum loss, divided by 10."""
    return float(lrs[int(np.argmin(losses))] / 10)


def suggest_steep(lrs: np.ndarray, losses: np.ndarray) -> float:
    """The lr where the loss falls fastest against log(lr)."""
    slopes = np.diff(losses) / np.diff(np.log(lrs))
    return float(lrs[int(np.argmin(slopes))])


SUGGEST = {"valley": suggest_valley, "minimum": suggest_minimum, "steep": suggest_steep}


@dataclass(frozen=True)
class LrFindResult:
    lrs: list[float]
    losses: list[float]  # smoothed
    suggestions: dict[str, float]

    def to_dict(self) -> dict:
        return asdict(self)


def _forever(batches: Iterable) -> Iterator:
    while True:
        yield from batches


def lr_find(model: nn.Module, batches: Iterable, loss_fn: Callable[[tuple], torch.Tensor],
            make_optimizer: Callable[[], torch.optim.Optimizer], *, config: LrFindConfig,
            set_mode: Callable[[], None]) -> LrFindResult:
    """Sweep config.start..config.end over config.num_it batches; the model's weights are restored."""
    saved = copy.deepcopy(model.state_dict())
    optimizer = make_optimizer()
    peaks = [g["lr"] for g in optimizer.param_groups]
    lrs = exp_lrs(config.start, config.end, config.num_it)
    raw, smoothed, best = [], [], math.inf
    try:
        set_mode()
        for i, (lr, batch) in enumerate(zip(lrs, _forever(batches)), start=1):
            for group, peak in zip(optimizer.param_groups, peaks):
                group["lr"] = lr * peak / peaks[-1]  # keep the differential ratios between groups
            loss = loss_fn(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            raw.append(loss.item())
            smoothed = smooth_losses(raw)
            if diverged(smoothed[-1], best, i):
                break
            best = min(best, smoothed[-1])
    finally:
        model.load_state_dict(saved)  # bit-exact: the sweep leaves no trace
    n = len(smoothed) - 1 if len(smoothed) > 2 else len(smoothed)  # drop the diverged last point
    used_lrs, used = lrs[:n], np.asarray(smoothed[:n])
    suggestions = suggest(used_lrs, used) if n > 2 else {}
    return LrFindResult([float(x) for x in used_lrs], [float(x) for x in used], suggestions)


def suggest(lrs: np.ndarray, losses: np.ndarray) -> dict[str, float]:
    """Every suggestion, kept inside the swept range (``minimum`` divides by 10 and could leave it)."""
    return {name: float(np.clip(fn(lrs, losses), lrs[0], lrs[-1])) for name, fn in SUGGEST.items()}


def plot_lr_find(result: LrFindResult, path: Path) -> None:
    """Smoothed loss against a log lr axis with one label per decade; the y range covers the sweep up
    to its lowest loss, so the diverging tail does not squash the useful part."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogLocator, NullFormatter

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(result.lrs, result.losses)
    for (name, lr), marker in zip(result.suggestions.items(), "o^s"):
        ax.plot([lr], [np.interp(np.log(lr), np.log(result.lrs), result.losses)], marker, markersize=8, label=f"{name} {lr:.2e}")
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, numticks=12))
    ax.xaxis.set_minor_formatter(NullFormatter())
    if result.losses:  # everything up to the minimum in view; the diverging tail may leave the top
        best = int(np.argmin(result.losses))
        low, high = result.losses[best], max(result.losses[: best + 1])
        margin = 0.08 * (high - low) + 1e-6
        ax.set_ylim(low - margin, high + margin)
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel("smoothed training loss")
    ax.set_title(f"lr_find: {len(result.lrs)} steps, {result.lrs[0]:.0e} to {result.lrs[-1]:.1e}" if result.lrs else "lr_find")
    ax.grid(alpha=0.3, which="major")
    if result.suggestions:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
