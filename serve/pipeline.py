"""What the Triton python-backend models compute, as plain testable classes."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from clfpipe.inference import probabilities
from clfpipe.ort import make_session, ort_logits
from clfpipe.preprocess import PreprocessSpec, preprocess_bytes


def _param(parameters: Mapping[str, Any], key: str) -> str:
    """Triton passes config parameters as {key: {"string_value": ...}}."""
    return parameters[key]["string_value"]


@dataclass(frozen=True)
class Preprocessor:
    spec: PreprocessSpec

    @classmethod
    def from_parameters(cls, parameters: Mapping[str, Any]) -> "Preprocessor":
        return cls(PreprocessSpec.from_dict(json.loads(_param(parameters, "preprocess"))))

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """(batch, 1) encoded images -> (batch, 3, crop, crop) float32; ValueError names the bad one."""
        out = []
        flat = images.reshape(-1)
        for index, data in enumerate(flat):
            try:
                out.append(preprocess_bytes(bytes(data), self.spec))
            except ValueError as exc:
                where = f"image {index} of {len(flat)}: " if len(flat) > 1 else ""
                raise ValueError(f"{where}{exc}") from exc
        return np.stack(out)


class OnnxProbabilities:
    """ONNX Runtime logits -> probabilities (softmax; sigmoid per tag for multi-label)."""

    def __init__(self, onnx_path: Path, threads: int = 0, multi_label: bool = False) -> None:
        self.session = make_session(onnx_path, threads)
        self.multi_label = multi_label

    @classmethod
    def from_parameters(cls, parameters: Mapping[str, Any], repository: str, version: str) -> "OnnxProbabilities":
        path = Path(repository) / version / _param(parameters, "onnx_file")
        return cls(path, int(_param(parameters, "ort_threads")), _param(parameters, "activation") == "sigmoid")

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return probabilities(ort_logits(self.session, batch), self.multi_label).astype(np.float32)
