"""Metrics as pure functions: accuracy, the Planet competition's F2 with its threshold search, and
how closely two runtimes agree on the same inputs."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from clfpipe.contract.probabilities import tagged

# fastai lesson 2 searched the F2 threshold in this range for the Planet data.
THRESHOLDS = np.round(np.arange(0.17, 0.245, 0.01), 2)


def accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    return float((probs.argmax(1) == labels).mean())


def f2_score(probs: np.ndarray, targets: np.ndarray, threshold: float, beta: float = 2.0) -> float:
    """Mean over samples of F_beta = (1+b^2) tp / ((1+b^2) tp + b^2 fn + fp); a sample with no true
    and no predicted tag scores 1 (nothing to find, nothing claimed)."""
    predicted = tagged(probs, threshold)
    truth = targets.astype(bool)
    tp = (predicted & truth).sum(1)
    fp = (predicted & ~truth).sum(1)
    fn = (~predicted & truth).sum(1)
    b2 = beta * beta
    denom = (1 + b2) * tp + b2 * fn + fp
    scores = np.where(denom == 0, 1.0, (1 + b2) * tp / np.maximum(denom, 1))
    return float(scores.mean())


def best_threshold(probs: np.ndarray, targets: np.ndarray, candidates: np.ndarray = THRESHOLDS) -> tuple[float, float]:
    """(threshold, F2) with the highest F2 among the candidates; the lowest threshold wins ties."""
    scores = [f2_score(probs, targets, float(t)) for t in candidates]
    best = int(np.argmax(scores))
    return float(candidates[best]), float(scores[best])


def metric_name(multi_label: bool) -> str:
    return "f2" if multi_label else "accuracy"


def score(probs: np.ndarray, labels: np.ndarray, threshold: float | None = None) -> float:
    """The task's metric: accuracy for class indices; F2 for multi-hot labels, at ``threshold`` or,
    when none is given, at the best threshold searched on these predictions."""
    if labels.ndim == 2:
        if threshold is None:
            return best_threshold(probs, labels)[1]
        return f2_score(probs, labels, threshold)
    return accuracy(probs, labels)


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """The worst row's cosine similarity."""
    num = (a * b).sum(1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return float(np.min(num / np.maximum(den, 1e-30))) if len(a) else 1.0


@dataclass(frozen=True)
class Agreement:
    """Figures of test vs reference outputs on the same inputs."""

    images: int
    top1_agreement: float  # fraction of rows whose argmax is equal
    max_abs_diff: float
    max_abs_ref: float
    tolerance: float  # rtol * max_abs_ref + atol
    passed: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        return (f"{self.images} images: top-1 agreement {self.top1_agreement:.4f}, max |diff| {self.max_abs_diff:.3g} "
                f"(tolerance {self.tolerance:.3g} = rtol x max|ref| {self.max_abs_ref:.3g} + atol)")


def compare(reference: np.ndarray, test: np.ndarray, rtol: float, atol: float) -> Agreement:
    """Pass when every top-1 is equal and max|test - ref| <= rtol * max|ref| + atol.

    The tolerance scales with the output magnitude: fp32 kernels differ by ~1e-6 relative, so a
    fixed 1e-5 fails a correct resnet34 export whose logits reach ~90.
    """
    if reference.shape != test.shape:
        raise ValueError(f"expected outputs of equal shape, got {reference.shape} and {test.shape}")
    max_ref = float(np.abs(reference).max()) if reference.size else 0.0
    max_diff = float(np.abs(test.astype(np.float64) - reference.astype(np.float64)).max()) if reference.size else 0.0
    top1 = float((reference.argmax(-1) == test.argmax(-1)).mean()) if len(reference) else 1.0
    tolerance = rtol * max_ref + atol
    return Agreement(len(reference), top1, max_diff, max_ref, tolerance, top1 == 1.0 and max_diff <= tolerance)
