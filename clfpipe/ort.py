"""ONNX Runtime sessions on the CPU, as export checks and the Triton python backend use them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

INPUT_NAME = "input"
OUTPUT_NAME = "logits"


def make_session(path: str | Path, intra_op_threads: int = 0,
                 providers: tuple[str, ...] = ("CPUExecutionProvider",), spin: bool = True) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads  # 0: ONNX Runtime picks (all cores)
    options.log_severity_level = 3
    if not spin:  # idle threads sleep instead of spinning: they leave the cores to other processes
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=list(providers))


def ort_logits(session: ort.InferenceSession, batch: np.ndarray, batch_size: int = 64) -> np.ndarray:
    output = session.get_outputs()[0].name  # "logits", or "probs" when TTA is folded in
    outs = [session.run([output], {INPUT_NAME: batch[i : i + batch_size]})[0] for i in range(0, len(batch), batch_size)]
    return np.concatenate(outs)
