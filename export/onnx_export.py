"""ONNX export of every variant, each behind its agreement gate (reference section 3).

A variant's graph maps ``input`` to ``logits`` (or ``probs`` with TTA folded in) with a dynamic
batch dimension at the recipe's pinned opset, saved as one self-contained file with the class
names and preprocessing spec in its metadata. Before an artifact enters the manifest, PyTorch
(fp32, the same folded wrapper) and ONNX Runtime run every validation image and the variant's
gate must pass; otherwise the export fails with the figures and the manifest stays as it was.
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import onnx
import torch

from clfpipe.dataset import Split, scan_data
from clfpipe.errors import DataError, ExportError
from clfpipe.inference import load_run_model, torch_logits
from clfpipe.manifest import Manifest, RunDir, library_versions
from clfpipe.models import Classifier
from clfpipe.ort import INPUT_NAME, make_session, ort_logits
from clfpipe.preprocess import load_pixels
from export.gates import GateResult, gate
from export.variants import Folded, Variant, example_input, variant_inputs

ONNX_ARTIFACT = "onnx"
ONNX_FILE = "model.onnx"
EXPORT_VERSIONS = ("torch", "onnx", "onnxscript", "onnxruntime")


def write_onnx(model: torch.nn.Module, path: Path, example: torch.Tensor, opset: int, metadata: dict[str, str],
               output_name: str = "logits") -> None:
    """Export an eval-mode module to one ONNX file with a dynamic batch and named tensors."""
    model.eval()  # train mode exports BatchNorm/Dropout wrongly (reference section 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, (example,), input_names=[INPUT_NAME], output_names=[output_name],
                                    opset_version=opset, dynamic_shapes=({0: "batch"},), dynamo=True, verbose=False)
    proto = program.model_proto
    set_metadata(proto, metadata)
    onnx.save_model(proto, str(path), save_as_external_data=False)
    onnx.checker.check_model(str(path), full_check=True)


def set_metadata(proto: onnx.ModelProto, metadata: dict[str, str]) -> None:
    del proto.metadata_props[:]
    for key, value in metadata.items():
        proto.metadata_props.add(key=key, value=value)


def validation_split(manifest: Manifest, data_dir: Path | None) -> Split:
    root = Path(data_dir) if data_dir else Path(manifest.data["data_dir"])
    try:
        return scan_data(root, "valid", manifest.recipe.data.labels_csv, classes=tuple(manifest.classes))
    except DataError as exc:
        raise ExportError(f"cannot read the validation images for the agreement gate: {exc} (pass --data)") from exc


def reference_outputs(model: Classifier, manifest: Manifest, variant: Variant, pixels: np.ndarray) -> np.ndarray:
    """PyTorch fp32 through the same folded wrapper: what every runtime is judged against."""
    folded = Folded(model, manifest.preprocess, variant, manifest.recipe.multi_label)
    return torch_logits(folded, variant_inputs(pixels, manifest.preprocess, variant))


def judge(variant: Variant, manifest: Manifest, reference: np.ndarray, test: np.ndarray, labels: np.ndarray) -> GateResult:
    """The variant's gate, at the recipe's tolerances."""
    export = manifest.recipe.export
    return gate(variant.precision, reference, test.astype(np.float32), labels, variant.fold_tta,
                manifest.recipe.multi_label, export.rtol, export.atol)


def check_variant(path: Path, model: Classifier, manifest: Manifest, variant: Variant, split: Split,
                  providers: tuple[str, ...] = ("CPUExecutionProvider",), pixels: np.ndarray | None = None) -> GateResult:
    """ONNX Runtime on `path` against PyTorch fp32 on the split (pixels: the split's, if already loaded)."""
    pixels = load_pixels(split.files, manifest.preprocess) if pixels is None else pixels
    reference = reference_outputs(model, manifest, variant, pixels)
    test = ort_logits(make_session(path, providers=providers), variant_inputs(pixels, manifest.preprocess, variant))
    return judge(variant, manifest, reference, test, np.asarray(split.labels))


def _convert_precision(fp32_path: Path, out: Path, variant: Variant, manifest: Manifest, split_train: Split,
                       calibration: int, metadata: dict[str, str]) -> dict:
    """fp16 conversion or int8 static quantization of an fp32 graph; returns what to record."""
    if variant.precision == "fp16":
        from onnxruntime.transformers.float16 import convert_float_to_float16

        proto = convert_float_to_float16(onnx.load(str(fp32_path)), keep_io_types=True)
        proto = topologically_sorted(proto)  # the converter appends its input Casts after their users
        set_metadata(proto, metadata)
        onnx.save_model(proto, str(out))
        onnx.checker.check_model(str(out))
        return {}
    from export.quantize import quantize_int8

    files = calibration_files(split_train, calibration, manifest.recipe.seed)
    quantize_int8(fp32_path, out, variant_inputs(load_pixels(files, manifest.preprocess), manifest.preprocess, variant),
                  symmetric_activations=variant.precision == "int8-trt", method=manifest.recipe.export.calibration_method)
    proto = onnx.load(str(out))
    set_metadata(proto, metadata)
    onnx.save_model(proto, str(out))
    onnx.checker.check_model(str(out))
    return {"calibration_images": len(files), "calibration_sha256": _files_digest(files),
            "calibration_method": manifest.recipe.export.calibration_method}


def topologically_sorted(proto: onnx.ModelProto) -> onnx.ModelProto:
    import onnx_ir
    from onnx_ir.passes.common import TopologicalSortPass

    model = onnx_ir.from_proto(proto)
    TopologicalSortPass()(model)
    return onnx_ir.to_proto(model)


def calibration_files(split: Split, count: int, seed: int) -> list[Path]:
    """A seeded sample of training images: the same calibration set for the same run."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(split.files))[: min(count, len(split.files))]
    return [split.files[i] for i in sorted(order)]


def _files_digest(files: list[Path]) -> str:
    import hashlib

    digest = hashlib.sha256()
    for f in files:
        digest.update(f.read_bytes())
    return digest.hexdigest()


def export_onnx(run_dir: Path, data_dir: Path | None = None, log: Callable[[str], None] = print,
                variant: Variant = Variant(), calibration: int | None = None) -> Manifest:
    """Export one variant of the run's checkpoint, gate it, then record it in the manifest."""
    return export_variants(run_dir, [variant], data_dir, log, calibration)


def export_variants(run_dir: Path, variants: Sequence[Variant], data_dir: Path | None = None,
                    log: Callable[[str], None] = print, calibration: int | None = None) -> Manifest:
    """Export several variants; the model, the validation images and their pixels load once.
    Each variant enters the manifest as soon as it passes; a failure keeps those before it."""
    run = RunDir(run_dir)
    manifest = run.read()
    model = load_run_model(run, manifest)
    split = validation_split(manifest, data_dir)
    pixels = load_pixels(split.files, manifest.preprocess)
    root = Path(data_dir or manifest.data["data_dir"])
    for variant in variants:
        manifest = _export_one(run, manifest, model, split, pixels, root, variant, calibration, log)
    return manifest


def _export_one(run: RunDir, manifest: Manifest, model: Classifier, split: Split, pixels: np.ndarray, data_root: Path,
                variant: Variant, calibration: int | None, log: Callable[[str], None]) -> Manifest:
    run_dir = run.path
    spec, recipe = manifest.preprocess, manifest.recipe
    final = run_dir / variant.file_name
    staging, fp32_staging = run_dir / f".{variant.file_name}.partial", run_dir / f".{variant.file_name}.fp32.partial"
    start = time.perf_counter()
    metadata = {"classes": json.dumps(manifest.classes), "preprocess": json.dumps(spec.to_dict()),
                "variant": json.dumps(variant.to_dict()), "multi_label": json.dumps(recipe.multi_label)}
    try:
        folded = Folded(model, spec, variant, recipe.multi_label)
        fp32_path = staging if variant.precision == "fp32" else fp32_staging
        write_onnx(folded, fp32_path, example_input(variant, spec.crop), recipe.export.opset, metadata, variant.output_name)
        extra = {}
        if variant.precision != "fp32":
            train_split = scan_data(data_root, "train", recipe.data.labels_csv, tuple(manifest.classes), verify=False)
            count = calibration or recipe.export.calibration_images
            extra = _convert_precision(fp32_path, staging, variant, manifest, train_split, count, metadata)
        result = check_variant(staging, model, manifest, variant, split, pixels=pixels)
        if not result.passed:
            raise ExportError(f"{variant.name} fails its gate against PyTorch: {result.summary()}")
        staging.replace(final)
    finally:
        staging.unlink(missing_ok=True)
        fp32_staging.unlink(missing_ok=True)
    seconds = time.perf_counter() - start
    input_shape = ["batch", spec.crop, spec.crop, 3] if variant.fold_preprocess else ["batch", 3, spec.crop, spec.crop]
    manifest = manifest.with_artifact(
        variant.name, run_dir, final, "export", library_versions(EXPORT_VERSIONS),
        opset=recipe.export.opset, variant=variant.to_dict(),
        inputs={INPUT_NAME: {"shape": input_shape, "dtype": "uint8" if variant.fold_preprocess else "float32"}},
        outputs={variant.output_name: ["batch", len(manifest.classes)]}, gate=result.to_dict(), **extra,
    )
    previous = manifest.data["stages"].get("export", {})
    figures = {"variants": {**previous.get("variants", {}), variant.name: {"gate": result.to_dict(), "seconds": round(seconds, 2)}}}
    # the plain graph's gate is the skeleton's "agreement", read by the demo
    agreement = result.to_dict() if variant.name == ONNX_ARTIFACT else previous.get("agreement")
    if agreement is not None:
        figures["agreement"] = agreement
    manifest = manifest.with_stage("export", figures)
    run.write(manifest)
    log(f"export: {final} ({final.stat().st_size / 1e6:.1f} MB, {variant.name}, opset {recipe.export.opset}) in {seconds:.1f}s")
    log(f"export: PyTorch vs ONNX Runtime ({variant.name}) on {result.summary()}")
    return manifest
