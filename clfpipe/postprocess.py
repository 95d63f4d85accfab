"""Top-k labels for the server's LABELS output. Depends on numpy only, so the container
repository can ship this module beside its model.py."""

from __future__ import annotations

import json
from typing import Sequence

import numpy as np


def top_k_labels(probs: np.ndarray, classes: Sequence[str], k: int) -> np.ndarray:
    """(N, C) probabilities -> (N, k) object array of b'label:prob', highest first (stable on ties)."""
    k = max(1, min(k, len(classes)))
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return np.array([[f"{classes[j]}:{row[j]:.6f}".encode() for j in idx] for row, idx in zip(probs, order)], dtype=np.object_)


def requested_top_k(parameters_json: str, default: int) -> int:
    """k from the request's parameters ({"top_k": k}), else the configured default."""
    params = json.loads(parameters_json or "{}")
    if "top_k" not in params:
        return default
    value = params["top_k"]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"top_k: expected a positive integer, got {value!r}")
    return value
