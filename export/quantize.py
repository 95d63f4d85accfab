"""int8 static quantization with onnxruntime.quantization (QDQ, per-channel int8 weights).

Two forms: ``int8`` with asymmetric uint8 activations (U8S8), the fast
form for ONNX Runtime on x86, and ``int8-trt`` with symmetric int8 activations and weights, the
explicit quantization TensorRT consumes.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from clfpipe.contract import tensors


def even_batch(count: int, largest: int = 16) -> int:
    """The largest batch size up to ``largest`` that divides ``count``: ORT's histogram calibrators
    (percentile, entropy) stack each tensor's outputs across batches, so every batch must have one
    shape (20 images in batches of 16 and 4 raised numpy's "inhomogeneous shape" ValueError)."""
    return max((b for b in range(1, min(largest, count) + 1) if count % b == 0), default=1)


class ArrayReader(CalibrationDataReader):
    """Feeds calibration inputs in batches of one size (``even_batch``), in order (deterministic)."""

    def __init__(self, inputs: np.ndarray) -> None:
        size = even_batch(len(inputs))
        self.batches = [inputs[i : i + size] for i in range(0, len(inputs), size)]
        self.position = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.position >= len(self.batches):
            return None
        self.position += 1
        return {tensors.INPUT: self.batches[self.position - 1]}

    def rewind(self) -> None:
        self.position = 0


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Swallow what the quantizer prints, and its root-logger warnings (a NullHandler keeps
    logging.warning from configuring the root logger for the rest of the process)."""
    root, null = logging.getLogger(), logging.NullHandler()
    level = root.level
    root.addHandler(null)
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)
        root.removeHandler(null)


METHODS = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy, "percentile": CalibrationMethod.Percentile}


def quantize_int8(fp32_path: Path, out: Path, calibration_inputs: np.ndarray, *, symmetric_activations: bool,
                  method: str = "percentile") -> None:
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        # The concat-pool head's Concat with a dynamic batch breaks ORT's symbolic shape
        # inference: skip it, keep ONNX shape inference and graph optimisation.
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        with _quiet():  # the quantizer prints its progress and logs per-tensor warnings to the root logger
            quantize_static(
                str(prepared), str(out), ArrayReader(calibration_inputs),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QInt8 if symmetric_activations else QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=METHODS[method],
                extra_options={"ActivationSymmetric": symmetric_activations, "WeightSymmetric": True, "CalibPercentile": 99.99},
            )
