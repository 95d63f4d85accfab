"""Agreement gates per precision (reference section 3): pure functions over outputs and labels.

- fp32: every top-1 equal and max|diff| <= rtol * max|ref| + atol;
- fp16: top-1 agreement >= 99.5% and cosine of probabilities >= 0.999 (the worst image);
- int8 and int8-trt: accuracy at most 1 point below PyTorch fp32 (MLPerf's 99% rule, on this data).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from clfpipe.agreement import compare
from clfpipe.inference import probabilities

FP16_TOP1, FP16_COSINE, INT8_DROP = 0.995, 0.999, 0.01


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
    accuracy_ref: float
    accuracy: float
    accuracy_delta: float

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        return (f"{self.images} images: top-1 agreement {self.top1_agreement:.4f}, max |diff| {self.max_abs_diff:.3g}, "
                f"min cosine {self.cosine_min:.6f}, accuracy {self.accuracy:.4f} vs {self.accuracy_ref:.4f} "
                f"({self.accuracy_delta:+.4f}); gate: {self.rule}")


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    num = (a * b).sum(1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return float(np.min(num / np.maximum(den, 1e-30))) if len(a) else 1.0


def _accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    if labels.ndim == 2:  # multi-label: exact-match of the tags at 0.5 is too harsh; use F2 at 0.2
        from train.metrics import f2_score

        return f2_score(probs, labels, 0.2)
    return float((probs.argmax(1) == labels).mean())


def gate(precision: str, reference: np.ndarray, test: np.ndarray, labels: np.ndarray, outputs_are_probs: bool,
         multi_label: bool, rtol: float, atol: float) -> GateResult:
    """Judge test outputs against PyTorch fp32 reference outputs of the same graph."""
    closeness = compare(reference, test, rtol, atol)
    ref_p = reference if outputs_are_probs else probabilities(reference.astype(np.float64), multi_label)
    test_p = test if outputs_are_probs else probabilities(test.astype(np.float64), multi_label)
    acc_ref, acc = _accuracy(ref_p, labels), _accuracy(test_p, labels)
    cosine = min_cosine(ref_p, test_p)
    if precision == "fp32":
        passed, rule = closeness.passed, f"top-1 identical and max|diff| <= {closeness.tolerance:.3g}"
    elif precision == "fp16":
        passed = closeness.top1_agreement >= FP16_TOP1 and cosine >= FP16_COSINE
        rule = f"top-1 agreement >= {FP16_TOP1} and cosine >= {FP16_COSINE}"
    else:
        passed, rule = acc_ref - acc <= INT8_DROP + 1e-12, f"accuracy drop <= {INT8_DROP:.2f}"
    return GateResult(precision, passed, rule, closeness.images, closeness.top1_agreement, closeness.max_abs_diff,
                      closeness.tolerance if precision == "fp32" else None, cosine, acc_ref, acc, acc - acc_ref)
