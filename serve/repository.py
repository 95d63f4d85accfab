"""Generate a Triton model repository for a run (configs are generated, never hand-written).

Layout for the embedded target (python backend, as the nvidia-pytriton binary has no ORT
backend):

    OUT/preprocess/{config.pbtxt, 1/model.py}            bytes -> float32 CHW
    OUT/backbone/{config.pbtxt, 1/model.py, 1/model.onnx} float32 CHW -> PROBS
    OUT/classifier/{config.pbtxt, 1/, labels.txt}         ensemble: IMAGE -> PROBS
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from clfpipe.errors import ManifestError
from clfpipe.manifest import Manifest, RunDir
from clfpipe.recipe import ServeConfig
from export.onnx_export import ONNX_ARTIFACT
from model_repository import TEMPLATES

TARGETS = ("embedded",)
ENSEMBLE = "classifier"
LABELS_FILE = "labels.txt"


def _tensor(name: str, dtype: int, dims: list[int], label_filename: str = "") -> mc.ModelInput:
    return dict(name=name, data_type=dtype, dims=dims, **({"label_filename": label_filename} if label_filename else {}))


def _python_model(name: str, serve: ServeConfig, instances: int, inputs: list, outputs: list, parameters: dict[str, str]) -> mc.ModelConfig:
    config = mc.ModelConfig(name=name, backend="python", max_batch_size=serve.max_batch_size)
    config.input.extend(mc.ModelInput(**t) for t in inputs)
    config.output.extend(mc.ModelOutput(**t) for t in outputs)
    config.dynamic_batching.max_queue_delay_microseconds = serve.max_queue_delay_us
    config.instance_group.append(mc.ModelInstanceGroup(kind=mc.ModelInstanceGroup.KIND_CPU, count=instances))
    for key, value in parameters.items():
        config.parameters[key].string_value = value
    return config


def preprocess_config(manifest: Manifest) -> mc.ModelConfig:
    serve, spec = manifest.recipe.serve, manifest.preprocess
    return _python_model(
        "preprocess", serve, serve.preprocess_instances,
        [_tensor("IMAGE", mc.TYPE_STRING, [1])],
        [_tensor("INPUT", mc.TYPE_FP32, [3, spec.crop, spec.crop])],
        {"preprocess": json.dumps(spec.to_dict())},
    )


def backbone_config(manifest: Manifest, onnx_file: str) -> mc.ModelConfig:
    serve, spec = manifest.recipe.serve, manifest.preprocess
    return _python_model(
        "backbone", serve, serve.model_instances,
        [_tensor("INPUT", mc.TYPE_FP32, [3, spec.crop, spec.crop])],
        [_tensor("PROBS", mc.TYPE_FP32, [len(manifest.classes)], LABELS_FILE)],
        {"onnx_file": onnx_file, "ort_threads": str(serve.ort_threads),
         "activation": "sigmoid" if manifest.recipe.multi_label else "softmax"},
    )


def ensemble_config(manifest: Manifest) -> mc.ModelConfig:
    config = mc.ModelConfig(name=ENSEMBLE, platform="ensemble", max_batch_size=manifest.recipe.serve.max_batch_size)
    config.input.append(mc.ModelInput(**_tensor("IMAGE", mc.TYPE_STRING, [1])))
    config.output.append(mc.ModelOutput(**_tensor("PROBS", mc.TYPE_FP32, [len(manifest.classes)], LABELS_FILE)))
    steps = config.ensemble_scheduling.step
    # input_map/output_map: key = the step model's tensor, value = the ensemble's tensor.
    steps.add(model_name="preprocess", model_version=-1, input_map={"IMAGE": "IMAGE"}, output_map={"INPUT": "pixels"})
    steps.add(model_name="backbone", model_version=-1, input_map={"INPUT": "pixels"}, output_map={"PROBS": "PROBS"})
    # Clients read the class names in order from the model config: the repository describes itself.
    config.parameters["classes"].string_value = json.dumps(manifest.classes)
    return config


def config_text(config: mc.ModelConfig) -> str:
    return text_format.MessageToString(config)


def _write_model(root: Path, config: mc.ModelConfig, files: dict[str, Path] | None = None, extra: dict[str, str] | None = None) -> None:
    model_dir = root / config.name
    (model_dir / "1").mkdir(parents=True)
    (model_dir / "config.pbtxt").write_text(config_text(config))
    for rel, source in (files or {}).items():
        target = model_dir / rel
        try:
            os.link(source, target)  # the ONNX can be large: share it with the run when possible
        except OSError:
            shutil.copy2(source, target)
    for rel, text in (extra or {}).items():
        (model_dir / rel).write_text(text)


def build_repository(run_dir: Path, out: Path | None = None, target: str = "embedded", log: Callable[[str], None] = print) -> Path:
    """Assemble OUT (default RUN_DIR/model_repository) atomically and record it in the manifest."""
    if target not in TARGETS:
        raise ManifestError(f"--target: expected one of {', '.join(TARGETS)}, got {target!r}")
    run = RunDir(run_dir)
    manifest = run.read()
    onnx_path = run.artifact_path(manifest, ONNX_ARTIFACT)
    out = Path(out) if out else run_dir / "model_repository"
    labels = "\n".join(manifest.classes) + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        _write_model(staging, preprocess_config(manifest), {"1/model.py": TEMPLATES / "preprocess" / "model.py"})
        _write_model(staging, backbone_config(manifest, onnx_path.name),
                     {"1/model.py": TEMPLATES / "backbone" / "model.py", f"1/{onnx_path.name}": onnx_path},
                     {LABELS_FILE: labels})
        _write_model(staging, ensemble_config(manifest), extra={LABELS_FILE: labels})
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    manifest = manifest.with_stage("repo", {"path": str(out.resolve()), "target": target,
                                            "models": ["preprocess", "backbone", ENSEMBLE]})
    run.write(manifest)
    log(f"repo: {target} repository with models preprocess, backbone, {ENSEMBLE} -> {out}")
    return out
