"""Metrics as pure functions: accuracy, and the Planet competition's F2 with its threshold search."""

from __future__ import annotations

import numpy as np

# fastai lesson 2 searched the threshold in this range for the Planet data.
THRESHOLDS = np.round(np.arange(0.17, 0.245, 0.01), 2)


def accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    return float((probs.argmax(1) == labels).mean())


def f2_score(probs: np.ndarray, targets: np.ndarray, threshold: float, beta: float = 2.0) -> float:
    """Mean over samples of F_beta = (1+b^2) tp / ((1+b^2) tp + b^2 fn + fp); a sample with no true
    and no predicted tag scores 1 (nothing to find, nothing claimed)."""
    predicted = probs > threshold
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
