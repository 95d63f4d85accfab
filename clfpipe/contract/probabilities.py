"""Activations (softmax for one label per image, a sigmoid per tag for multi-label) and the served
labels (top-k classes, or the tags above a multi-label model's threshold).

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
    return np.array([[_entry(classes[j], row[j]) for j in idx] for row, idx in zip(probs, order)], dtype=np.object_)


def _entry(name: str, prob: float) -> bytes:
    """One LABELS entry: b'label:prob' (clients split at the last colon: a name may hold one)."""
    return f"{name}:{prob:.6f}".encode()


def tagged(probs: np.ndarray, threshold: float) -> np.ndarray:
    """The tags a multi-label model claims: probability strictly above the threshold (F2 is scored,
    and the threshold chosen, by this same rule; the server and the client name the tags by it)."""
    return probs > threshold


def tag_labels(probs: np.ndarray, classes: Sequence[str], threshold: float, k: int) -> np.ndarray:
    """Multi-label: (N, C) probabilities -> (N, m) object array of b'label:prob' for the tags above
    the threshold, most probable first, at most k; rows with fewer are padded with b'' to the
    longest (m >= 1: an image without a tag is one b'')."""
    order = np.argsort(-probs, axis=1, kind="stable")
    claimed = tagged(probs, threshold)
    rows = [[_entry(classes[j], row[j]) for j in idx if claims[j]][: max(1, k)]
            for row, idx, claims in zip(probs, order, claimed)]
    width = max([1, *(len(r) for r in rows)])
    return np.array([r + [b""] * (width - len(r)) for r in rows], dtype=np.object_).reshape(len(rows), width)


def served_labels(probs: np.ndarray, classes: Sequence[str], k: int, threshold: float | None) -> np.ndarray:
    """The LABELS output: the k most probable classes, or with a threshold (multi-label) the tags
    above it (at most k)."""
    return top_k_labels(probs, classes, k) if threshold is None else tag_labels(probs, classes, threshold, k)


def label_parameters(parameters: dict, classes: Sequence[str]) -> tuple[int, float | None]:
    """(default k, threshold) from a labelling model's config parameters ({key: {"string_value": ...}}).
    A multi-label model names every tag above its threshold unless the request's top_k says fewer."""
    if "threshold" not in parameters:
        return int(parameters["top_k"]["string_value"]), None
    return len(classes), float(json.loads(parameters["threshold"]["string_value"]))


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
