"""Export variants: precision (fp32, fp16, int8, int8-trt) x folded preprocessing x folded TTA.

A variant is built from the eval-mode PyTorch model wrapped in ``Folded``, so the reference
every variant is gated against is the same wrapper run by PyTorch in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from clfpipe.errors import ExportError
from clfpipe.models import Classifier
from clfpipe.preprocess import PreprocessSpec
from clfpipe.tta import DETERMINISTIC_VIEWS, average_probs

PRECISIONS = ("fp32", "fp16", "int8", "int8-trt")


@dataclass(frozen=True)
class Variant:
    precision: str = "fp32"
    fold_preprocess: bool = False  # uint8 NHWC input (resized, cropped pixels); normalisation in the graph
    fold_tta: bool = False  # the deterministic TTA views and probability averaging in the graph

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ExportError(f"--precision: expected one of {', '.join(PRECISIONS)}, got {self.precision!r}")

    @property
    def name(self) -> str:
        """The manifest artifact name: 'onnx' for the plain fp32 graph, else e.g. 'onnx-int8-pre-tta'."""
        parts = [] if self.precision == "fp32" else [self.precision]
        parts += ["pre"] if self.fold_preprocess else []
        parts += ["tta"] if self.fold_tta else []
        return "-".join(["onnx", *parts])

    @property
    def file_name(self) -> str:
        return "model.onnx" if self.name == "onnx" else f"model-{self.name[5:]}.onnx"

    @property
    def output_name(self) -> str:
        return "probs" if self.fold_tta else "logits"

    def to_dict(self) -> dict:
        return {"precision": self.precision, "fold_preprocess": self.fold_preprocess, "fold_tta": self.fold_tta}

    @classmethod
    def from_dict(cls, data: dict) -> "Variant":
        return cls(data.get("precision", "fp32"), bool(data.get("fold_preprocess")), bool(data.get("fold_tta")))


class Folded(nn.Module):
    """The classifier with optional in-graph normalisation and TTA."""

    def __init__(self, model: Classifier, spec: PreprocessSpec, variant: Variant, multi_label: bool = False) -> None:
        super().__init__()
        self.model, self.variant, self.multi_label = model.eval(), variant, multi_label
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1) * 255.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.variant.fold_preprocess:
            # (x/255 - mean)/std == (x - 255 mean) / (255 std): one fewer op
            x = (x.permute(0, 3, 1, 2).float() - self.mean) / self.std
        if self.variant.fold_tta:
            return average_probs(self.model, x, DETERMINISTIC_VIEWS, self.multi_label)
        return self.model(x)


def example_input(variant: Variant, size: int, batch: int = 2) -> torch.Tensor:
    if variant.fold_preprocess:
        return torch.zeros(batch, size, size, 3, dtype=torch.uint8)
    return torch.zeros(batch, 3, size, size)


def variant_inputs(pixels: np.ndarray, spec: PreprocessSpec, variant: Variant) -> np.ndarray:
    """uint8 NHWC pixels from the spec -> what the variant's `input` takes."""
    from clfpipe.preprocess import normalize

    return np.ascontiguousarray(pixels) if variant.fold_preprocess else normalize(pixels, spec)
