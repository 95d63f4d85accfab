"""ONNX export of every variant, each behind its agreement gate.

A variant's graph maps ``input`` to ``logits`` (or ``probs`` with TTA folded in) with a dynamic
batch dimension at the recipe's pinned opset, saved as one self-contained file with the class
names and preprocessing spec in its metadata. Before an artifact enters the manifest, PyTorch
(fp32, the same folded graph) and ONNX Runtime run every validation image and the variant's gate
must pass; otherwise the export fails with the figures and the manifest stays as it was.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import onnx
import torch

from clfpipe.contract import tensors
from clfpipe.contract.dataset import Split, scan_data
from clfpipe.contract.engines import PRECISIONS, Variant
from clfpipe.contract.errors import DataError, ExportError
from clfpipe.contract.gates import GateResult, judge
from clfpipe.contract.lock import holding_run
from clfpipe.contract.manifest import Manifest, RunDir, library_versions
from clfpipe.contract.preprocess import load_pixels
from clfpipe.nn.folded import Folded, example_input
from clfpipe.nn.models import Classifier
from clfpipe.nn.reference import load_run_model, reference_outputs
from clfpipe.runtime import ort

log = logging.getLogger(__name__)
ONNX_ARTIFACT = Variant().name
EXPORT_VERSIONS = ("torch", "onnx", "onnxscript", "onnxruntime")


def write_onnx(model: torch.nn.Module, path: Path, example: torch.Tensor, *, opset: int, metadata: dict[str, str],
               output_name: str = tensors.LOGITS) -> None:
    """Export an eval-mode module to one ONNX file with a dynamic batch and named tensors."""
    model.eval()  # a module left in train mode exports BatchNorm and Dropout wrongly
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, (example,), input_names=[tensors.INPUT], output_names=[output_name],
                                    opset_version=opset, dynamic_shapes=({0: "batch"},), dynamo=True, verbose=False)
    proto = program.model_proto
    strip_build_details(proto)
    set_metadata(proto, metadata)
    onnx.save_model(proto, str(path), save_as_external_data=False)
    onnx.checker.check_model(str(path), full_check=True)


def strip_build_details(proto: onnx.ModelProto) -> None:
    """Drop what the exporter records about the machine that built the graph: per-node stack traces
    (absolute source paths), FX node names and scopes, on every node, value and subgraph."""
    def graph(g: onnx.GraphProto) -> None:
        for value in [*g.input, *g.output, *g.value_info, *g.initializer]:
            del value.metadata_props[:]
        del g.metadata_props[:]
        for node in g.node:
            del node.metadata_props[:]
            node.doc_string = ""
            for attribute in node.attribute:
                if attribute.HasField("g"):
                    graph(attribute.g)
                for sub in attribute.graphs:
                    graph(sub)

    graph(proto.graph)
    for function in proto.functions:
        for node in function.node:
            del node.metadata_props[:]


def set_metadata(proto: onnx.ModelProto, metadata: dict[str, str]) -> None:
    del proto.metadata_props[:]
    for key, value in metadata.items():
        proto.metadata_props.add(key=key, value=value)


def validation_split(run: RunDir, manifest: Manifest, data_dir: Path | None, option: str | None = "--data") -> Split:
    """DATA/valid of `data_dir`, else of the folder training read; `option`: what names another
    folder in the command at hand, for the error (None: none does)."""
    root = run.data_dir(manifest, data_dir)
    try:
        return scan_data(root, "valid", manifest.recipe.data.labels_csv, classes=tuple(manifest.classes))
    except DataError as exc:
        if data_dir:
            hint = f"{option}: expected a folder with the run's classes"
        else:
            hint = f"pass {option}, a folder with the run's classes" if option else "the data folder training read"
        raise ExportError(f"cannot read the validation images for the agreement gate: {exc} ({hint})") from exc


def gate_variant(variant: Variant, manifest: Manifest, *, reference: np.ndarray, test: np.ndarray, labels: np.ndarray) -> GateResult:
    """The variant's gate at the recipe's tolerances and the run's F2 threshold."""
    export = manifest.recipe.export
    threshold = manifest.data["stages"].get("train", {}).get("threshold")
    return judge(variant, reference, test, labels, multi_label=manifest.recipe.multi_label, rtol=export.rtol,
                 atol=export.atol, threshold=threshold)


def check_variant(path: Path, model: Classifier, manifest: Manifest, variant: Variant, *, split: Split,
                  pixels: np.ndarray | None = None) -> GateResult:
    """ONNX Runtime on `path` against PyTorch fp32 on the split (pixels: the split's, if already loaded)."""
    pixels = load_pixels(split.files, manifest.preprocess) if pixels is None else pixels
    reference = reference_outputs(model, manifest, variant, pixels)
    test = ort.run_graph(ort.make_session(path), pixels, prepare=variant.input_form.preparer(manifest.preprocess))
    return gate_variant(variant, manifest, reference=reference, test=test, labels=np.asarray(split.labels))


Calibration = Callable[[], np.ndarray]  # loads the int8 calibration inputs when called


def _to_fp16(fp32_path: Path, out: Path, *, precision: str, calibration: Calibration, method: str) -> None:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    proto = convert_float_to_float16(onnx.load(str(fp32_path)), keep_io_types=True)
    onnx.save_model(topologically_sorted(proto), str(out))  # the converter appends its input Casts after their users


def _to_int8(fp32_path: Path, out: Path, *, precision: str, calibration: Calibration, method: str) -> None:
    from clfpipe.export.quantize import quantize_int8

    quantize_int8(fp32_path, out, calibration(), symmetric_activations=PRECISIONS[precision].symmetric_activations,
                  method=method)


# How the fp32 graph becomes each precision's (PRECISIONS[...].onnx_form), and whether it calibrates
CONVERTERS: dict[str, tuple[Callable[..., None], bool]] = {
    "fp16": (_to_fp16, False),
    "int8": (_to_int8, True),
}


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
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.read_bytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class ExportInputs:
    """What every variant of one export shares, loaded once."""

    run: RunDir
    model: Classifier
    split: Split
    pixels: np.ndarray
    data_root: Path
    calibration: int  # images (``calibration_count``)


def export_onnx(run_dir: Path, data_dir: Path | None = None, variant: Variant = Variant(),
                calibration: int | None = None) -> Manifest:
    """Export one variant of the run's checkpoint, gate it, then record it in the manifest."""
    return export_variants(run_dir, [variant], data_dir, calibration)


@holding_run("export onnx")
def export_variants(run_dir: Path, variants: Sequence[Variant], data_dir: Path | None = None,
                    calibration: int | None = None) -> Manifest:
    """Export several variants; the model, the validation images and their pixels load once.
    Each variant enters the manifest as soon as it passes; a failure keeps those before it."""
    run = RunDir(run_dir)
    manifest = run.read()
    count = calibration_count(manifest, calibration)  # a bad count fails before minutes of loading, not after
    split = validation_split(run, manifest, data_dir)
    log.info("export: loading %d validation images for the agreement gates", len(split))
    inputs = ExportInputs(run, load_run_model(run, manifest), split, load_pixels(split.files, manifest.preprocess),
                          run.data_dir(manifest, data_dir), count)
    for variant in variants:
        manifest = _export_one(inputs, manifest, variant)
    return manifest


def calibration_count(manifest: Manifest, override: int | None) -> int:
    """The int8 calibration set's size: the recipe's, or ``override`` within the recipe's bounds
    for it (0 fell back to the recipe's 64 unsaid)."""
    config = manifest.recipe.export
    return (config if override is None else replace(config, calibration_images=override)).calibration_images


def _calibration_inputs(inputs: ExportInputs, manifest: Manifest, variant: Variant) -> tuple[Callable[[], np.ndarray], dict]:
    """A loader of the int8 calibration inputs, and what to record about them."""
    recipe = manifest.recipe
    train = scan_data(inputs.data_root, "train", recipe.data.labels_csv, tuple(manifest.classes), verify=False)
    files = calibration_files(train, inputs.calibration, recipe.seed)
    load = lambda: variant.input_form.prepare(load_pixels(files, manifest.preprocess), manifest.preprocess)  # noqa: E731
    return load, {"calibration_images": len(files), "calibration_sha256": _files_digest(files),
                  "calibration_method": recipe.export.calibration_method}


def _export_one(inputs: ExportInputs, manifest: Manifest, variant: Variant) -> Manifest:
    run_dir, spec, recipe = inputs.run.path, manifest.preprocess, manifest.recipe
    final = run_dir / variant.file_name
    staging, fp32_staging = run_dir / f".{variant.file_name}.partial", run_dir / f".{variant.file_name}.fp32.partial"
    start = time.perf_counter()
    log.info("export: %s ...", variant.name)
    metadata = {"classes": json.dumps(manifest.classes), "preprocess": json.dumps(spec.to_dict()),
                "variant": json.dumps(variant.to_dict()), "multi_label": json.dumps(recipe.multi_label)}
    extra: dict = {}
    try:
        folded = Folded(inputs.model, spec, variant, recipe.multi_label)
        fp32_path = staging if variant.precision == "fp32" else fp32_staging
        write_onnx(folded, fp32_path, example_input(variant, spec.crop), opset=recipe.export.opset, metadata=metadata,
                   output_name=variant.output_name)
        if variant.precision != "fp32":
            convert, calibrated = CONVERTERS[PRECISIONS[variant.precision].onnx_form]
            calibration, extra = _calibration_inputs(inputs, manifest, variant) if calibrated else (lambda: np.empty(0), {})
            convert(fp32_path, staging, precision=variant.precision, calibration=calibration, method=recipe.export.calibration_method)
            proto = onnx.load(str(staging))
            set_metadata(proto, metadata)
            onnx.save_model(proto, str(staging))
            onnx.checker.check_model(str(staging))
        result = check_variant(staging, inputs.model, manifest, variant, split=inputs.split, pixels=inputs.pixels)
        if not result.passed:
            raise ExportError(f"{variant.name} fails its gate against PyTorch: {result.summary()}")
        staging.replace(final)
    finally:
        staging.unlink(missing_ok=True)
        fp32_staging.unlink(missing_ok=True)
    seconds = time.perf_counter() - start
    manifest = manifest.with_artifact(
        variant.name, run_dir, final, stage="export", versions=library_versions(EXPORT_VERSIONS),
        opset=recipe.export.opset, variant=variant.to_dict(),
        inputs={tensors.INPUT: {"shape": variant.input_form.shape(spec.crop), "dtype": variant.input_form.dtype}},
        outputs={variant.output_name: ["batch", len(manifest.classes)]}, gate=result.to_dict(), **extra,
    )
    manifest = manifest.with_stage("export", _export_figures(manifest, variant, result, seconds))
    inputs.run.write(manifest)
    log.info("export: %s (%.1f MB, %s, opset %d) in %.1fs", final, final.stat().st_size / 1e6, variant.name,
             recipe.export.opset, seconds)
    log.info("export: PyTorch vs ONNX Runtime (%s) on %s", variant.name, result.summary())
    return manifest


def _export_figures(manifest: Manifest, variant: Variant, result: GateResult, seconds: float) -> dict:
    previous = manifest.data["stages"].get("export", {})
    figures = {"variants": {**previous.get("variants", {}), variant.name: {"gate": result.to_dict(), "seconds": round(seconds, 2)}}}
    # the plain graph's gate is the stage's headline "agreement"
    agreement = result.to_dict() if variant.name == ONNX_ARTIFACT else previous.get("agreement")
    if agreement is not None:
        figures["agreement"] = agreement
    return figures
