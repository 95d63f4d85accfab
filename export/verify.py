"""``clfpipe verify``: every exported artifact on every runtime this host has, against PyTorch fp32.

Runtimes come from a table keyed by engine: ONNX Runtime (CPU always, CUDA where its provider is
present) for ONNX graphs, TensorRT for plans where TensorRT and a GPU are. One row per artifact
and runtime, RUN_DIR/verify.json, and a failed gate makes the command exit non-zero.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from clfpipe.contract.dataset import Split, scan_data
from clfpipe.contract.engines import Variant
from clfpipe.contract.errors import ExportError
from clfpipe.contract.gates import GateResult
from clfpipe.contract.integrity import recorded_hashes, tree_problems
from clfpipe.contract.manifest import Manifest, RunDir, atomic_write_bytes
from clfpipe.contract.preprocess import load_pixels
from clfpipe.contract.progress import progress
from clfpipe.export.onnx_export import gate_variant, validation_split
from clfpipe.nn.reference import load_run_model, reference_outputs
from clfpipe.runtime import ort, tensorrt

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Row:
    artifact: str
    runtime: str
    result: GateResult


@dataclass(frozen=True)
class Verification:
    rows: list[Row]
    repositories: dict[str, list[str] | None]  # each repository the run recorded -> what differs ([]: as
    # written; None: not there any more, so nothing of it can be served)
    images: int

    @property
    def passed(self) -> bool:
        return all(r.result.passed for r in self.rows) and not any(self.repositories.values())


def repository_problems(run: RunDir, manifest: Manifest) -> dict[str, list[str] | None]:
    """Every repository 'clfpipe repo' recorded for the run: its files against their hashes, and the
    run artifacts it serves against the ones it was built from."""
    found = {}
    for entry in manifest.data["stages"].get("repo", {}).get("targets", {}).values():
        root = run.resolve(entry["path"])
        if not root.is_dir():
            found[entry["path"]] = None
            continue
        problems = tree_problems(root)
        for file, source in ((recorded_hashes(root) or {}).get("sources") or {}).items():
            current = manifest.data["artifacts"].get(source["artifact"], {}).get("sha256")
            if current != source["sha256"]:
                problems.append(f"stale: {file} was built from another {source['artifact']}")
        found[entry["path"]] = problems
    return found


Runner = Callable[[RunDir, Manifest, str, np.ndarray], list[tuple[str, np.ndarray]]]


def _onnx_outputs(run: RunDir, manifest: Manifest, name: str, inputs: np.ndarray) -> list[tuple[str, np.ndarray]]:
    path = run.artifact_path(manifest, name)
    return [(runtime, ort.run_graph(ort.make_session(path, providers=providers), inputs)) for runtime, providers in ort.providers_here()]


def _trt_outputs(run: RunDir, manifest: Manifest, name: str, inputs: np.ndarray) -> list[tuple[str, np.ndarray]]:
    ok, why = tensorrt.trt_status()
    if not ok:
        log.info("verify: skipping %s: %s", name, why)
        return []
    entry = manifest.artifact(name)
    engine = tensorrt.load_engine(run.artifact_path(manifest, name), entry.get("platform", {}), run.path, entry.get("source", "onnx"))
    return [("tensorrt", tensorrt.run_engine(engine, inputs, entry["profile"]["max"]))]


RUNNERS: dict[str, Runner] = {"onnx": _onnx_outputs, "trt": _trt_outputs}


def images_split(run: RunDir, manifest: Manifest, images: Path | None) -> Split:
    """The validation set, or a folder laid out like it (DIR/<class>/*.jpg, or tags for multi-label)."""
    if images is None:
        return validation_split(run, manifest, None)
    images = Path(images)
    return scan_data(images.parent, images.name, manifest.recipe.data.labels_csv, tuple(manifest.classes))


def verify_run(run_dir: Path, images: Path | None = None) -> Verification:
    run = RunDir(run_dir)
    manifest = run.read()
    model = load_run_model(run, manifest)
    split = images_split(run, manifest, images)
    pixels, labels = load_pixels(split.files, manifest.preprocess), np.asarray(split.labels)
    rows: list[Row] = []
    artifacts = [(name, entry) for name, entry in sorted(manifest.data["artifacts"].items()) if "variant" in entry]
    for name, entry in progress(artifacts, "verify", unit="artifact"):
        variant = Variant.from_dict(entry["variant"])
        inputs = variant.input_form.prepare(pixels, manifest.preprocess)
        reference = reference_outputs(model, manifest, variant, pixels)
        for runtime, out in RUNNERS[variant.engine](run, manifest, name, inputs):
            rows.append(Row(name, runtime, gate_variant(variant, manifest, reference=reference, test=out, labels=labels)))
    if not rows:
        raise ExportError(f"{run_dir} has no exported variants: run 'clfpipe export onnx --run {run_dir}' first")
    verification = Verification(rows, repository_problems(run, manifest), len(split))
    report = {"images": len(split), "passed": verification.passed, "tensorrt": tensorrt.trt_status()[1],
              "results": [{"artifact": r.artifact, "runtime": r.runtime, **r.result.to_dict()} for r in rows],
              "repositories": verification.repositories}
    atomic_write_bytes(Path(run_dir) / "verify.json", (json.dumps(report, indent=2) + "\n").encode())
    return verification


def format_table(verification: Verification) -> str:
    head = f"{'artifact':<22} {'runtime':<17} {'top-1 agr':>9} {'accuracy':>9} {'delta':>8} {'max|diff|':>10} {'cosine':>9}  gate"
    lines = [f"verify: {verification.images} images against PyTorch fp32", head, "-" * len(head)]
    for r in verification.rows:
        g = r.result
        lines.append(f"{r.artifact:<22} {r.runtime:<17} {g.top1_agreement:>9.4f} {g.accuracy:>9.4f} {g.accuracy_delta:>+8.4f} "
                     f"{g.max_abs_diff:>10.3g} {g.cosine_min:>9.6f}  {'pass' if g.passed else 'FAIL'} ({g.rule})")
    for path, problems in verification.repositories.items():
        state = "not found, not checked" if problems is None else f"FAIL ({'; '.join(problems[:3])})" if problems \
            else "pass (every file as 'clfpipe repo' wrote it)"
        lines.append(f"repository {path}: {state}")
    return "\n".join(lines)
