"""``clfpipe verify``: every exported variant on every available runtime against PyTorch fp32.

Runtimes: ONNX Runtime CPU always, ONNX Runtime CUDA where its provider is present, TensorRT
engines where TensorRT and a GPU are. One table per variant, RUN_DIR/verify.json, and a
non-zero exit when any gate fails.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnxruntime as ort

from clfpipe.dataset import Split, scan_data
from clfpipe.errors import ExportError
from clfpipe.inference import load_run_model
from clfpipe.manifest import Manifest, RunDir, atomic_write_bytes
from clfpipe.ort import make_session, ort_logits
from clfpipe.preprocess import load_pixels
from export.gates import GateResult
from export.onnx_export import judge, reference_outputs, validation_split
from export.tensorrt import load_engine, run_engine, trt_status
from export.variants import Variant, variant_inputs


@dataclass(frozen=True)
class Row:
    artifact: str
    runtime: str
    result: GateResult


def ort_runtimes() -> list[tuple[str, tuple[str, ...]]]:
    available = ort.get_available_providers()
    runtimes = [("onnxruntime-cpu", ("CPUExecutionProvider",))]
    if "CUDAExecutionProvider" in available:
        runtimes.append(("onnxruntime-cuda", ("CUDAExecutionProvider", "CPUExecutionProvider")))
    return runtimes


def images_split(manifest: Manifest, images: Path | None) -> Split:
    """The validation set, or a folder laid out like it (DIR/<class>/*.jpg, or tags for multi-label)."""
    if images is None:
        return validation_split(manifest, None)
    images = Path(images)
    return scan_data(images.parent, images.name, manifest.recipe.data.labels_csv, tuple(manifest.classes))


def verify_run(run_dir: Path, images: Path | None = None, log: Callable[[str], None] = print) -> tuple[list[Row], bool]:
    run = RunDir(run_dir)
    manifest = run.read()
    model = load_run_model(run, manifest)
    split = images_split(manifest, images)
    pixels, labels = load_pixels(split.files, manifest.preprocess), np.asarray(split.labels)
    rows: list[Row] = []
    trt_ok, trt_why = trt_status()
    for name, entry in sorted(manifest.data["artifacts"].items()):
        if "variant" not in entry:
            continue
        variant = Variant.from_dict(entry["variant"])
        inputs = variant_inputs(pixels, manifest.preprocess, variant)
        reference = reference_outputs(model, manifest, variant, pixels)
        outputs: list[tuple[str, np.ndarray]] = []
        if name.startswith("onnx"):
            path = run.artifact_path(manifest, name)
            outputs = [(rt, ort_logits(make_session(path, providers=providers), inputs)) for rt, providers in ort_runtimes()]
        elif name.startswith("trt"):
            if not trt_ok:
                log(f"verify: skipping {name}: {trt_why}")
                continue
            outputs = [("tensorrt", run_engine(load_engine(run_dir, manifest, name), inputs, entry["profile"]["max"]))]
        for runtime, out in outputs:
            rows.append(Row(name, runtime, judge(variant, manifest, reference, out, labels)))
    if not rows:
        raise ExportError(f"{run_dir} has no exported variants: run 'clfpipe export onnx --run {run_dir}' first")
    passed = all(r.result.passed for r in rows)
    report = {"images": len(split), "passed": passed, "tensorrt": trt_why,
              "results": [{"artifact": r.artifact, "runtime": r.runtime, **r.result.to_dict()} for r in rows]}
    atomic_write_bytes(run_dir / "verify.json", (json.dumps(report, indent=2) + "\n").encode())
    log(format_table(rows, len(split)))
    return rows, passed


def format_table(rows: list[Row], images: int) -> str:
    head = f"{'artifact':<22} {'runtime':<17} {'top-1 agr':>9} {'accuracy':>9} {'delta':>8} {'max|diff|':>10} {'cosine':>9}  gate"
    lines = [f"verify: {images} images against PyTorch fp32", head, "-" * len(head)]
    for r in rows:
        g = r.result
        lines.append(f"{r.artifact:<22} {r.runtime:<17} {g.top1_agreement:>9.4f} {g.accuracy:>9.4f} {g.accuracy_delta:>+8.4f} "
                     f"{g.max_abs_diff:>10.3g} {g.cosine_min:>9.6f}  {'pass' if g.passed else 'FAIL'} ({g.rule})")
    return "\n".join(lines)
