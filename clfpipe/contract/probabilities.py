"""Activations (softmax for one label per image, a sigmoid per tag for multi-label) and top-k labels.

Depends on NumPy only: the container repository ships this file beside its Triton model code.
"""

from __future__ import annotations

import json
from typing import Callable, Sequence

import numpy as np

SOFTMAX, SIGMOID, NONE = "softmax", "sigmoid", "none"  # NONE: the graph already outputs probabilities


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def sigmoid(logits: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-logits))


ACTIVATIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {SOFTMAX: softmax, SIGMOID: sigmoid, NONE: lambda x: x}


def activation_for(multi_label: bool, probs_in_graph: bool = False) -> str:
    """The one place that chooses: probabilities already in the graph, sigmoid, or softmax."""
    if probs_in_graph:
        return NONE
    return SIGMOID if multi_label else SOFTMAX


def activate(outputs: np.ndarray, activation: str) -> np.ndarray:
    if activation not in ACTIVATIONS:
        raise ValueError(f"expected activation {', '.join(ACTIVATIONS)}, got {activation!r}")
    return ACTIVATIONS[activation](outputs)


def probabilities(logits: np.ndarray, multi_label: bool = False) -> np.ndarray:
    """Softmax over classes, or an independent sigmoid per tag (multi-label)."""
    return activate(logits, activation_for(multi_label))


def top_k_labels(probs: np.ndarray, classes: Sequence[str], k: int) -> np.ndarray:
    """(N, C) probabilities -> (N, k) object array of b'label:prob', highest first (stable on ties)."""
    k = max(1, min(k, len(classes)))
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return np.array([[f"{classes[j]}:{row[j]:.6f}".encode() for j in idx] for row, idx in zip(probs, order)], dtype=np.object_)


def requested_top_k(parameters_json: str, default: int, key: str = "top_k") -> int:
    """k from the request's parameters ({"top_k": k}), else the configured default. What a client
    sent is a ValueError naming it, cut short: the message goes back to that client."""
    params = json.loads(parameters_json or "{}")  # JSONDecodeError is a ValueError
    if not isinstance(params, dict):
        raise ValueError(f"request parameters: expected a JSON object, got {_shown(params)}")
    if key not in params:
        return default
    value = params[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{key}: expected a positive integer, got {_shown(value)}")
    return value


def _shown(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"
