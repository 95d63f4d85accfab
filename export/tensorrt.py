"""TensorRT engines from exported ONNX variants, through TensorRT's documented Python API.

TensorRT 11 networks are strongly typed: precision comes from the ONNX graph (fp16-converted, or
explicit Q/DQ int8); TensorRT 10 still takes builder flags, set from the precision's entry in
``contract.engines.PRECISIONS``. Without TensorRT and a GPU every entry point says so in one line.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from clfpipe.contract import tensors
from clfpipe.contract.engines import PRECISIONS, Variant
from clfpipe.contract.errors import ExportError
from clfpipe.contract.lock import holding_run
from clfpipe.contract.manifest import Manifest, RunDir, atomic_write_bytes, library_versions
from clfpipe.contract.recipe import MAX_BATCH_SIZE
from clfpipe.runtime.tensorrt import current_platform, require_trt

log = logging.getLogger(__name__)
TIMING_CACHE = "trt_timing.cache"


def check_profile(min_batch: int, opt_batch: int, max_batch: int) -> None:
    if not 1 <= min_batch <= opt_batch <= max_batch <= MAX_BATCH_SIZE:  # no served model asks for more
        raise ExportError(f"expected 1 <= min-batch <= opt-batch <= max-batch <= {MAX_BATCH_SIZE}, "
                          f"got {min_batch}, {opt_batch}, {max_batch}")


def _engine_of(entry: dict) -> str:
    return entry["variant"].get("engine", "onnx") if "variant" in entry else "not an exported graph"


def onnx_source(manifest: Manifest, name: str) -> tuple[Variant, dict]:
    """The ONNX variant a plan is built from, and its manifest entry; another artifact is refused."""
    entry = manifest.artifact(name)
    if _engine_of(entry) != "onnx":
        names = sorted(n for n, e in manifest.data["artifacts"].items() if _engine_of(e) == "onnx")
        raise ExportError(f"--variant: expected an ONNX variant ({', '.join(names) or 'none exported'}), "
                          f"got {name!r} ({_engine_of(entry)})")
    return Variant.from_dict(entry["variant"]), entry


@holding_run("export trt")
def build_engine(run_dir: Path, variant_name: str = "onnx", *, min_batch: int = 1, opt_batch: int = 8,
                 max_batch: int = 32) -> Manifest:
    """Build and record the plan of an exported ONNX variant with an optimization profile on `input`.
    What the user named (the profile, the run, the variant) is checked before TensorRT is needed."""
    check_profile(min_batch, opt_batch, max_batch)
    run = RunDir(run_dir)
    manifest = run.read()
    source, entry = onnx_source(manifest, variant_name)
    onnx_path = run.artifact_path(manifest, variant_name)
    engine = source.on("trt")
    trt = require_trt()
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
    flag = PRECISIONS[source.precision].trt_flag
    if not strongly_typed and flag:  # TensorRT 10: precision from flags; 11 reads it from the graph
        config.set_flag(getattr(trt.BuilderFlag, flag))
    rest = tuple(entry["inputs"][tensors.INPUT]["shape"][1:])
    profile = builder.create_optimization_profile()
    profile.set_shape(tensors.INPUT, (min_batch, *rest), (opt_batch, *rest), (max_batch, *rest))
    config.add_optimization_profile(profile)
    cache_path = Path(run_dir) / TIMING_CACHE
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.exists() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"TensorRT failed to build an engine from {onnx_path} (see the messages above)")
    atomic_write_bytes(cache_path, bytes(config.get_timing_cache().serialize()))
    plan = Path(run_dir) / engine.file_name
    atomic_write_bytes(plan, bytes(serialized))
    manifest = manifest.with_artifact(engine.name, Path(run_dir), plan, stage="export", versions=library_versions(("tensorrt",)),
                                      source=variant_name, variant=engine.to_dict(), platform=current_platform(),
                                      profile={"min": min_batch, "opt": opt_batch, "max": max_batch},
                                      strongly_typed=strongly_typed, inputs=entry["inputs"], outputs=entry["outputs"])
    run.write(manifest)
    log.info("export trt: %s from %s in %.1fs (%s)", plan, variant_name, time.perf_counter() - start, current_platform())
    return manifest
