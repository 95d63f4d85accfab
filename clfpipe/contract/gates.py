"""The agreement gate: a variant's outputs against PyTorch fp32 outputs of the same graph, judged by
its precision's ``Gate`` (see ``engines.PRECISIONS``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from clfpipe.contract.engines import Gate, Variant
from clfpipe.contract.metrics import compare, metric_name, min_cosine, score
from clfpipe.contract.probabilities import activate


@dataclass(frozen=True)
class GateResult:
    precision: str
    passed: bool
    rule: str
    images: int
    top1_agreement: float
    max_abs_diff: float
    tolerance: float | None
    cosine_min: float
    accuracy_ref: float  # the task's metric (``metric``), under the name the manifests have recorded
    accuracy: float
    accuracy_delta: float
    metric: str = "accuracy"  # f2 for multi-label runs: the figures above said 'accuracy' of an F2

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        return (f"{self.images} images: top-1 agreement {self.top1_agreement:.4f}, max |diff| {self.max_abs_diff:.3g}, "
                f"min cosine {self.cosine_min:.6f}, {self.metric} {self.accuracy:.4f} vs {self.accuracy_ref:.4f} "
                f"({self.accuracy_delta:+.4f}); gate: {self.rule}")


def allowed_drop(gate: Gate, images: int) -> float:
    """The metric drop a gate allows: its share, but never less than one image (on 90 images one
    flipped prediction is 1.1 points, which a 1-point rule would call a failure)."""
    return max(gate.max_metric_drop or 0.0, 1.0 / images if images else 0.0)


def _conditions(gate: Gate, tolerance: float, images: int, metric: str) -> list[str]:
    rules = [f"top-1 identical and max|diff| <= {tolerance:.3g}"] if gate.exact else []
    rules += [f"top-1 agreement >= {gate.min_top1}"] if gate.min_top1 else []
    rules += [f"cosine >= {gate.min_cosine}"] if gate.min_cosine else []
    if gate.max_metric_drop is not None:
        rules.append(f"{metric} drop <= {gate.max_metric_drop:.2f} or one image ({allowed_drop(gate, images):.4f})")
    return rules


def judge(variant: Variant, reference: np.ndarray, test: np.ndarray, labels: np.ndarray, *, multi_label: bool,
          rtol: float, atol: float, threshold: float | None = None, gate: Gate | None = None) -> GateResult:
    """Judge test outputs against the PyTorch fp32 reference by `gate` (default: the variant's
    precision's); ``threshold`` is the run's searched F2 threshold (multi-label)."""
    gate = gate or variant.gate
    test = test.astype(np.float32)
    closeness = compare(reference, test, rtol, atol)
    activation = variant.activation(multi_label)
    ref_p, test_p = activate(reference.astype(np.float64), activation), activate(test.astype(np.float64), activation)
    metric_ref, metric = score(ref_p, labels, threshold), score(test_p, labels, threshold)
    cosine = min_cosine(ref_p, test_p)
    checks = [closeness.passed] if gate.exact else []
    checks += [closeness.top1_agreement >= gate.min_top1, cosine >= gate.min_cosine]
    if gate.max_metric_drop is not None:
        checks.append(metric_ref - metric <= allowed_drop(gate, closeness.images) + 1e-12)
    name = metric_name(multi_label)
    return GateResult(variant.precision, all(checks), " and ".join(_conditions(gate, closeness.tolerance, closeness.images, name)),
                      closeness.images, closeness.top1_agreement, closeness.max_abs_diff,
                      closeness.tolerance if gate.exact else None, cosine, metric_ref, metric, metric - metric_ref, name)
