"""TensorRT engines at run time, through TensorRT's documented Python API (Polygraphy's TrtRunner
manages the device buffers). TensorRT is absent from the machines this project is built and tested
on: every entry point says so in one line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from clfpipe.contract import tensors
from clfpipe.contract.engines import Prepare, in_chunks
from clfpipe.contract.errors import ExportError


def trt_status() -> tuple[bool, str]:
    """(available, TensorRT version or why not)."""
    try:
        import tensorrt
    except ImportError:
        return False, "TensorRT is not installed (expected the 'tensorrt' package on a machine with an NVIDIA GPU)"
    import torch

    if not torch.cuda.is_available():
        return False, "no CUDA device: a TensorRT engine is built on the GPU it will run on"
    return True, tensorrt.__version__


def require_trt() -> Any:
    ok, why = trt_status()
    if not ok:
        raise ExportError(f"cannot use TensorRT: {why}")
    import tensorrt

    return tensorrt


def current_platform() -> dict[str, str]:
    import tensorrt
    import torch

    major, minor = torch.cuda.get_device_capability()
    return {"tensorrt": tensorrt.__version__, "gpu": torch.cuda.get_device_name(), "compute_capability": f"{major}.{minor}"}


def check_engine_platform(recorded: dict[str, str], current: dict[str, str], run_dir: Path, source: str) -> None:
    """A plan only loads on the TensorRT version and GPU that built it."""
    diffs = [f"{key} {recorded.get(key)!r} here {current.get(key)!r}" for key in ("tensorrt", "gpu", "compute_capability")
             if recorded.get(key) != current.get(key)]
    if diffs:
        raise ExportError(f"the engine was built for another platform ({'; '.join(diffs)}): rebuild it here with "
                          f"'clfpipe export trt --run {run_dir} --variant {source}'")


def load_engine(path: Path, recorded_platform: dict[str, str], run_dir: Path, source: str) -> Any:
    """Deserialize a plan after checking it was built for this TensorRT and GPU."""
    trt = require_trt()
    check_engine_platform(recorded_platform, current_platform(), run_dir, source)
    engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(path.read_bytes())
    if engine is None:
        raise ExportError(f"TensorRT could not deserialize {path}: rebuild it with 'clfpipe export trt --run {run_dir}'")
    return engine


def run_engine(engine: Any, inputs: np.ndarray, batch_size: int, prepare: Prepare | None = None,
               min_batch: int = 1) -> np.ndarray:
    """The engine's one output for `inputs` in batches within its profile, `min_batch` to `batch_size`
    (``in_chunks``): a last chunk below the profile's least is padded with repeats, their outputs dropped."""
    from polygraphy.backend.trt import TrtRunner

    with TrtRunner(engine) as runner:
        def run(x: np.ndarray) -> np.ndarray:
            padded = x if len(x) >= min_batch else np.resize(x, (min_batch, *x.shape[1:]))
            # copied: TrtRunner's outputs are views of host buffers it reuses, so the next call overwrote them
            return np.array(next(iter(runner.infer({tensors.INPUT: padded}).values()))[: len(x)])

        return in_chunks(run, inputs, batch_size, prepare)
