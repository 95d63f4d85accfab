"""What the Triton python-backend backbone computes, as a plain testable class.

(The preprocessing step is ``clfpipe.preprocess.Preprocessor``: it must stand alone.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from clfpipe.inference import probabilities
from clfpipe.ort import make_session, ort_logits


def _param(parameters: Mapping[str, Any], key: str) -> str:
    """Triton passes config parameters as {key: {"string_value": ...}}."""
    return parameters[key]["string_value"]


class OnnxProbabilities:
    """ONNX Runtime -> probabilities: softmax of logits, a sigmoid per tag (multi-label), or
    none when the graph already outputs probabilities (TTA folded in)."""

    def __init__(self, onnx_path: Path, threads: int = 0, activation: str = "softmax", spin: bool = True) -> None:
        if activation not in ("softmax", "sigmoid", "none"):
            raise ValueError(f"expected activation softmax, sigmoid or none, got {activation!r}")
        self.session = make_session(onnx_path, threads, spin=spin)
        self.activation = activation

    @classmethod
    def from_parameters(cls, parameters: Mapping[str, Any], repository: str, version: str) -> "OnnxProbabilities":
        path = Path(repository) / version / _param(parameters, "onnx_file")
        spin = parameters.get("ort_spin", {}).get("string_value", "true") == "true"
        return cls(path, int(_param(parameters, "ort_threads")), _param(parameters, "activation"), spin)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        out = ort_logits(self.session, batch)
        if self.activation != "none":
            out = probabilities(out, self.activation == "sigmoid")
        return out.astype(np.float32)
