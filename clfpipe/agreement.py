"""How closely two runtimes agree: one pure function shared by export, serving and the demo."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


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
    fixed 1e-5 fails a correct export whose logits reach ~90 (reference section 3).
    """
    if reference.shape != test.shape:
        raise ValueError(f"expected outputs of equal shape, got {reference.shape} and {test.shape}")
    max_ref = float(np.abs(reference).max()) if reference.size else 0.0
    max_diff = float(np.abs(test.astype(np.float64) - reference.astype(np.float64)).max()) if reference.size else 0.0
    top1 = float((reference.argmax(-1) == test.argmax(-1)).mean()) if len(reference) else 1.0
    tolerance = rtol * max_ref + atol
    return Agreement(len(reference), top1, max_diff, max_ref, tolerance, top1 == 1.0 and max_diff <= tolerance)
