"""ONNX Runtime sessions: the export gates, ``verify`` and the served backbone run graphs here."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np
import onnxruntime as ort

from clfpipe.contract import tensors
from clfpipe.contract.engines import CHUNK, Prepare, in_chunks
from clfpipe.contract.probabilities import activate

CPU = ("CPUExecutionProvider",)


def providers_here() -> list[tuple[str, tuple[str, ...]]]:
    """(runtime name, providers) for every ONNX Runtime device this host has."""
    available = ort.get_available_providers()
    runtimes = [("onnxruntime-cpu", CPU)]
    if "CUDAExecutionProvider" in available:
        runtimes.append(("onnxruntime-cuda", ("CUDAExecutionProvider", *CPU)))
    return runtimes


def make_session(path: str | Path, intra_op_threads: int = 0, providers: tuple[str, ...] = CPU,
                 spin: bool = True) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads  # 0: ONNX Runtime picks (all cores)
    options.log_severity_level = 3
    if not spin:  # idle threads sleep instead of spinning: they leave the cores to other processes
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=list(providers))


def run_graph(session: ort.InferenceSession, batch: np.ndarray, batch_size: int = CHUNK,
              prepare: Prepare | None = None) -> np.ndarray:
    """The graph's one output (logits, or probs with TTA folded in) for a batch, in chunks; `prepare`
    turns each chunk into the graph's input (``in_chunks``)."""
    output = session.get_outputs()[0].name
    return in_chunks(lambda x: session.run([output], {tensors.INPUT: x})[0], batch, batch_size, prepare)


class OnnxProbabilities:
    """A graph on ONNX Runtime -> probabilities, as the served backbone computes them."""

    def __init__(self, onnx_path: Path, threads: int = 0, activation: str = "softmax", spin: bool = True) -> None:
        activate(np.zeros((1, 1)), activation)  # an unknown name fails here, not on the first request
        self.session = make_session(onnx_path, threads, spin=spin)
        self.activation = activation

    @classmethod
    def from_parameters(cls, parameters: Mapping[str, Any], model_dir: Path) -> "OnnxProbabilities":
        """From a Triton config's parameters ({key: {"string_value": ...}})."""
        value = lambda key, default=None: parameters.get(key, {}).get("string_value", default)  # noqa: E731
        return cls(model_dir / value("model_file"), int(value("ort_threads", "0")), value("activation"),
                   value("ort_spin", "true") == "true")

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return activate(run_graph(self.session, batch), self.activation).astype(np.float32)

    def close(self) -> None:
        self.session = None
