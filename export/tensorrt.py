"""TensorRT engines from exported ONNX variants, through TensorRT's documented Python API.

TensorRT 11 networks are strongly typed: precision comes from the ONNX graph (fp16-converted,
or explicit Q/DQ int8); older TensorRT still takes builder flags, set from the variant.
TensorRT cannot be installed on the machines this project is built on (reference section 3):
every entry point says so in one line, and the tests skip with that reason.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from clfpipe.errors import ExportError
from clfpipe.manifest import Manifest, RunDir, atomic_write_bytes, library_versions
from clfpipe.ort import INPUT_NAME
from export.variants import Variant

TIMING_CACHE = "trt_timing.cache"


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


def current_platform() -> dict[str, str]:
    import tensorrt
    import torch

    major, minor = torch.cuda.get_device_capability()
    return {"tensorrt": tensorrt.__version__, "gpu": torch.cuda.get_device_name(), "compute_capability": f"{major}.{minor}"}


def check_engine_platform(recorded: dict[str, str], current: dict[str, str], run_dir: Path, variant: str) -> None:
    """An engine only loads on the TensorRT version and GPU that built it (reference section 2)."""
    diffs = [f"{key} {recorded.get(key)!r} here {current.get(key)!r}" for key in ("tensorrt", "gpu", "compute_capability")
             if recorded.get(key) != current.get(key)]
    if diffs:
        raise ExportError(f"the engine was built for another platform ({'; '.join(diffs)}): rebuild it here with "
                          f"'clfpipe export trt --run {run_dir} --variant {variant}'")


def engine_name(variant_name: str) -> str:
    return "trt" + variant_name[4:]  # onnx-fp16 -> trt-fp16


def _require_trt() -> Any:
    ok, why = trt_status()
    if not ok:
        raise ExportError(f"cannot use TensorRT: {why}")
    import tensorrt

    return tensorrt


def build_engine(run_dir: Path, variant_name: str = "onnx", min_batch: int = 1, opt_batch: int = 8, max_batch: int = 32,
                 log: Callable[[str], None] = print) -> Manifest:
    """Build and record RUN_DIR/model-<variant>.plan with an optimization profile on `input`."""
    trt = _require_trt()
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise ExportError(f"expected 1 <= min-batch <= opt-batch <= max-batch, got {min_batch}, {opt_batch}, {max_batch}")
    run = RunDir(run_dir)
    manifest = run.read()
    onnx_path = run.artifact_path(manifest, variant_name)
    entry = manifest.artifact(variant_name)
    variant = Variant.from_dict(entry.get("variant", {}))
    start = time.perf_counter()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    strongly_typed = hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    if not strongly_typed:  # TensorRT 10: precision from flags; 11 reads it from the graph
        if variant.precision == "fp16":
            config.set_flag(trt.BuilderFlag.FP16)
        elif variant.precision.startswith("int8"):
            config.set_flag(trt.BuilderFlag.INT8)
    rest = tuple(entry["inputs"][INPUT_NAME]["shape"][1:])
    profile = builder.create_optimization_profile()
    profile.set_shape(INPUT_NAME, (min_batch, *rest), (opt_batch, *rest), (max_batch, *rest))
    config.add_optimization_profile(profile)
    cache_path = run_dir / TIMING_CACHE
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.exists() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"TensorRT failed to build an engine from {onnx_path} (see the messages above)")
    atomic_write_bytes(cache_path, bytes(config.get_timing_cache().serialize()))
    plan = run_dir / f"model-{engine_name(variant_name)[4:] or 'fp32'}.plan"
    atomic_write_bytes(plan, bytes(serialized))
    name = engine_name(variant_name)
    manifest = manifest.with_artifact(name, run_dir, plan, "export", library_versions(("tensorrt",)),
                                      source=variant_name, variant=variant.to_dict(), platform=current_platform(),
                                      profile={"min": min_batch, "opt": opt_batch, "max": max_batch},
                                      strongly_typed=strongly_typed, inputs=entry["inputs"], outputs=entry["outputs"])
    run.write(manifest)
    log(f"export trt: {plan} from {variant_name} in {time.perf_counter() - start:.1f}s ({current_platform()})")
    return manifest


def load_engine(run_dir: Path, manifest: Manifest, name: str) -> Any:
    """Deserialize an engine after checking it was built for this TensorRT and GPU."""
    trt = _require_trt()
    entry = manifest.artifact(name)
    check_engine_platform(entry.get("platform", {}), current_platform(), run_dir, entry.get("source", "onnx"))
    path = RunDir(run_dir).artifact_path(manifest, name)
    engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(path.read_bytes())
    if engine is None:
        raise ExportError(f"TensorRT could not deserialize {path}: rebuild it with 'clfpipe export trt --run {run_dir}'")
    return engine


def run_engine(engine: Any, inputs: np.ndarray, batch_size: int) -> np.ndarray:
    """Run an engine with Polygraphy's TrtRunner (it manages the device buffers)."""
    from polygraphy.backend.trt import TrtRunner

    outs = []
    with TrtRunner(engine) as runner:
        for i in range(0, len(inputs), batch_size):
            result = runner.infer({INPUT_NAME: inputs[i : i + batch_size]})
            outs.append(np.asarray(next(iter(result.values()))))
    return np.concatenate(outs)
