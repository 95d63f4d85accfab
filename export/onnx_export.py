"""ONNX export with the agreement gate (reference section 3).

The graph maps ``input`` (float32 NCHW, normalised) to ``logits`` with a dynamic batch
dimension, at the recipe's pinned opset, saved as one self-contained file. Before the artifact
enters the manifest, PyTorch and ONNX Runtime run every validation image; the export fails with
the figures when top-1 differs anywhere or max |diff| exceeds rtol x max|logit| + atol.
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import torch

from clfpipe.agreement import Agreement, compare
from clfpipe.dataset import scan_split
from clfpipe.errors import DataError, ExportError
from clfpipe.inference import files_to_batch, load_run_model, torch_logits
from clfpipe.manifest import Manifest, RunDir, library_versions
from clfpipe.models import Classifier
from clfpipe.ort import INPUT_NAME, OUTPUT_NAME, make_session, ort_logits

ONNX_ARTIFACT = "onnx"
ONNX_FILE = "model.onnx"
EXPORT_VERSIONS = ("torch", "onnx", "onnxscript", "onnxruntime")


def write_onnx(model: Classifier, path: Path, size: int, opset: int, metadata: dict[str, str]) -> None:
    """Export an eval-mode model to one ONNX file with a dynamic batch and named tensors."""
    model.eval()  # train mode exports BatchNorm/Dropout wrongly (reference section 3)
    example = torch.zeros(2, 3, size, size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model,
            (example,),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            opset_version=opset,
            dynamic_shapes=({0: "batch"},),
            dynamo=True,
            verbose=False,
        )
    proto = program.model_proto
    for key, value in metadata.items():
        proto.metadata_props.add(key=key, value=value)
    onnx.save_model(proto, str(path), save_as_external_data=False)
    onnx.checker.check_model(str(path), full_check=True)


def validation_files(manifest: Manifest, data_dir: Path | None) -> tuple[list[Path], list[int]]:
    root = Path(data_dir) if data_dir else Path(manifest.data["data_dir"])
    try:
        split = scan_split(root, "valid", classes=tuple(manifest.classes))
    except DataError as exc:
        raise ExportError(f"cannot read the validation images for the agreement gate: {exc} (pass --data)") from exc
    return list(split.files), list(split.labels)


def check_agreement(model: Classifier, onnx_path: Path, manifest: Manifest, files: list[Path]) -> Agreement:
    """PyTorch vs ONNX Runtime logits on the given image files."""
    batch = files_to_batch(files, manifest.preprocess)
    reference = torch_logits(model, batch)
    test = ort_logits(make_session(onnx_path), batch)
    export = manifest.recipe.export
    return compare(reference, test, export.rtol, export.atol)


def export_onnx(run_dir: Path, data_dir: Path | None = None, log: Callable[[str], None] = print) -> Manifest:
    """Export the run's checkpoint, gate it, then record it in the manifest."""
    run = RunDir(run_dir)
    manifest = run.read()
    model = load_run_model(run, manifest)
    files, _ = validation_files(manifest, data_dir)
    spec, recipe = manifest.preprocess, manifest.recipe
    final, staging = run_dir / ONNX_FILE, run_dir / f".{ONNX_FILE}.partial"
    start = time.perf_counter()
    metadata = {"classes": json.dumps(manifest.classes), "preprocess": json.dumps(spec.to_dict())}
    try:
        write_onnx(model, staging, spec.crop, recipe.export.opset, metadata)
        agreement = check_agreement(model, staging, manifest, files)
        if not agreement.passed:
            raise ExportError(f"ONNX Runtime disagrees with PyTorch: {agreement.summary()}")
        staging.replace(final)
    finally:
        staging.unlink(missing_ok=True)
    seconds = time.perf_counter() - start
    manifest = manifest.with_artifact(
        ONNX_ARTIFACT, run_dir, final, "export", library_versions(EXPORT_VERSIONS),
        opset=recipe.export.opset, inputs={INPUT_NAME: ["batch", 3, spec.crop, spec.crop]},
        outputs={OUTPUT_NAME: ["batch", len(manifest.classes)]},
    )
    manifest = manifest.with_stage("export", {"agreement": agreement.to_dict(), "seconds": round(seconds, 2)})
    run.write(manifest)
    log(f"export: {final} ({final.stat().st_size / 1e6:.1f} MB, opset {recipe.export.opset}) in {seconds:.1f}s")
    log(f"export: PyTorch vs ONNX Runtime on {agreement.summary()}")
    return manifest
