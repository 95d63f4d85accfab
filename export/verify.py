"""``clfpipe verify``: every exported artifact on every runtime this host has, against PyTorch fp32.

Runtimes come from a table keyed by engine: ONNX Runtime (CPU always, CUDA where its provider is
present) for ONNX graphs, TensorRT for plans where TensorRT and a GPU are. One row per artifact
and runtime, RUN_DIR/verify.json, and a failed gate makes the command exit non-zero.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from onnxruntime import InferenceSession

from clfpipe.contract.dataset import Split, scan_data
from clfpipe.contract.engines import Prepare, Variant, in_chunks
from clfpipe.contract.errors import DataError, ExportError, ManifestError
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
    seconds_per_batch: float | None = None  # the profile: median of a few calls on one batch, on this host


@dataclass(frozen=True)
class Verification:
    rows: list[Row]
    repositories: dict[str, list[str] | None]  # each repository the run recorded -> what differs ([]: as
    # written; None: not there any more, so nothing of it can be served)
    images: int
    batch: int = 0  # images per profiled call
    unreadable: dict[str, str] = field(default_factory=dict)  # artifact -> why it was not checked (missing, changed)

    @property
    def passed(self) -> bool:
        return all(r.result.passed for r in self.rows) and not any(self.repositories.values()) and not self.unreadable


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


Measured = tuple[str, np.ndarray, float | None]  # runtime, outputs, seconds per call on the profile batch
# run, manifest, artifact name, its file (checked against its sha256 once, by the caller), the spec's
# uint8 pixels, what turns a chunk of them into the artifact's input (``in_chunks``), profile batch
Runner = Callable[[RunDir, Manifest, str, Path, np.ndarray, Prepare, np.ndarray], list[Measured]]


def _onnx_outputs(run: RunDir, manifest: Manifest, name: str, path: Path, pixels: np.ndarray, prepare: Prepare,
                  probe: np.ndarray) -> list[Measured]:
    """Every ONNX Runtime device here; the profile is the CPU provider's (the first)."""
    found = []
    for i, (runtime, providers) in enumerate(ort.providers_here()):
        session = ort.make_session(path, providers=providers)
        found.append((runtime, ort.run_graph(session, pixels, prepare=prepare),
                      _onnx_seconds(session, probe) if i == 0 else None))
    return found


def _trt_outputs(run: RunDir, manifest: Manifest, name: str, path: Path, pixels: np.ndarray, prepare: Prepare,
                 probe: np.ndarray) -> list[Measured]:
    ok, why = tensorrt.trt_status()
    if not ok:
        log.info("verify: skipping %s: %s", name, why)
        return []
    entry = manifest.artifact(name)
    engine = tensorrt.load_engine(path, entry.get("platform", {}), run.path, entry.get("source", "onnx"))
    profile = entry["profile"]
    return [("tensorrt", tensorrt.run_engine(engine, pixels, profile["max"], prepare, profile["min"]), None)]


def _torch_outputs(run: RunDir, manifest: Manifest, name: str, path: Path, pixels: np.ndarray, prepare: Prepare,
                   probe: np.ndarray) -> list[Measured]:
    """A torch artifact on this host's device: an AOTInductor package in a child process (loading
    one has crashed a process), the exported program in this one; outputs and profile from one load."""
    from clfpipe.runtime import torch_engine

    engine = Variant.from_dict(manifest.artifact(name)["variant"]).engine
    device = torch_engine.device_here()
    if engine == "aoti":
        outputs, why, seconds = torch_engine.run_in_child(engine, path, pixels, probe, prepare=prepare)
        if outputs is None:
            raise ExportError(f"{name}: {why}; export it again here with 'clfpipe export pt2 --run {run.path}'")
    else:
        runner = torch_engine.load(engine, path)
        outputs = in_chunks(runner, pixels, prepare=prepare)
        seconds = torch_engine.seconds_per_batch(runner, probe)
    return [(f"{engine}-{device.type}", outputs, seconds)]


RUNNERS: dict[str, Runner] = {"onnx": _onnx_outputs, "trt": _trt_outputs, "aoti": _torch_outputs, "torch": _torch_outputs}


def _onnx_seconds(session: InferenceSession, batch: np.ndarray) -> float:
    from clfpipe.runtime.torch_engine import seconds_per_batch

    return seconds_per_batch(lambda x: ort.run_graph(session, x, len(x)), batch)


def profile(run: RunDir, manifest: Manifest, name: str, batch: np.ndarray) -> float | None:
    """Seconds per call on `batch` for an artifact on this host's default runtime for its engine
    (ONNX Runtime's CPU provider, or the torch engines in a child process); None where none runs here."""
    variant = Variant.from_dict(manifest.artifact(name)["variant"])
    path = run.artifact_path(manifest, name)
    if variant.engine == "onnx":
        return _onnx_seconds(ort.make_session(path), batch)
    if variant.engine in ("aoti", "torch"):
        from clfpipe.runtime.torch_engine import profile_in_child

        return profile_in_child(variant.engine, path, batch)
    return None


def profile_batch_size(manifest: Manifest) -> int:
    return min(64, manifest.recipe.serve.max_batch_size)


def images_split(run: RunDir, manifest: Manifest, images: Path | None) -> Split:
    """The validation set, or a folder laid out like it (DIR/<class>/*.jpg with some of the run's
    classes, or tags for multi-label)."""
    if images is None:
        return validation_split(run, manifest, None, option="--images")
    images = Path(images)
    if not images.is_dir():
        what = "a file, not a folder" if images.exists() else "no such folder"
        raise DataError(f"--images: expected a folder laid out like DATA/valid (<class>/*.jpg), got {images} ({what})")
    return scan_data(images.parent, images.name, manifest.recipe.data.labels_csv, tuple(manifest.classes), some_classes=True)


def verify_run(run_dir: Path, images: Path | None = None,
               served: Callable[[Split], Sequence[Row]] | None = None) -> Verification:
    """Every exported variant on every runtime here against PyTorch fp32 on the validation set (or
    `images`), after `served`'s rows: what the caller measures of a running server on the same
    split, before any variant is run (a server that cannot answer is said at once)."""
    run = RunDir(run_dir)
    manifest = run.read()
    split = images_split(run, manifest, images)
    rows: list[Row] = list(served(split)) if served is not None else []
    model = load_run_model(run, manifest)
    pixels, labels = load_pixels(split.files, manifest.preprocess), np.asarray(split.labels)
    unreadable: dict[str, str] = {}
    artifacts = [(name, entry) for name, entry in sorted(manifest.data["artifacts"].items()) if "variant" in entry]
    batch = profile_batch_size(manifest)
    for name, entry in progress(artifacts, "verify", unit="artifact"):
        try:  # a missing or changed file is a failure of its own: the first one stopped the whole check
            path = run.artifact_path(manifest, name)
        except ManifestError as exc:
            unreadable[name] = str(exc)
            continue
        variant = Variant.from_dict(entry["variant"])
        prepare = variant.input_form.preparer(manifest.preprocess)
        reference = reference_outputs(model, manifest, variant, pixels)
        probe = prepare(np.resize(pixels[:batch], (batch, *pixels.shape[1:])))  # resize copies what it is given
        for runtime, out, seconds in RUNNERS[variant.engine](run, manifest, name, path, pixels, prepare, probe):
            result = gate_variant(variant, manifest, reference=reference, test=out, labels=labels)
            rows.append(Row(name, runtime, result, seconds))
    if not artifacts:
        raise ExportError(f"{run_dir} has no exported variants: run 'clfpipe export onnx --run {run_dir}' first")
    verification = Verification(rows, repository_problems(run, manifest), len(split), batch, unreadable)
    report = {"images": len(split), "passed": verification.passed, "tensorrt": tensorrt.trt_status()[1],
              "profile_batch": batch,
              "results": [{"artifact": r.artifact, "runtime": r.runtime, "seconds_per_batch": r.seconds_per_batch,
                           **r.result.to_dict()} for r in rows],
              "unreadable": unreadable, "repositories": verification.repositories}
    atomic_write_bytes(Path(run_dir) / "verify.json", (json.dumps(report, indent=2) + "\n").encode())
    return verification


def format_table(verification: Verification) -> str:
    metric = verification.rows[0].result.metric if verification.rows else "accuracy"  # one run: one metric
    head = (f"{'artifact':<22} {'runtime':<17} {'top-1 agr':>9} {metric:>9} {'delta':>8} {'max|diff|':>10} {'cosine':>9} "
            f"{'ms/batch':>9}  gate")
    lines = [f"verify: {verification.images} images against PyTorch fp32 (ms/batch: median on one batch of "
             f"{verification.batch} on this host)", head, "-" * len(head)]
    for r in verification.rows:
        g = r.result
        ms = f"{r.seconds_per_batch * 1000:>9.1f}" if r.seconds_per_batch is not None else f"{'-':>9}"
        lines.append(f"{r.artifact:<22} {r.runtime:<17} {g.top1_agreement:>9.4f} {g.accuracy:>9.4f} {g.accuracy_delta:>+8.4f} "
                     f"{g.max_abs_diff:>10.3g} {g.cosine_min:>9.6f} {ms}  {'pass' if g.passed else 'FAIL'} ({g.rule})")
    for name, why in verification.unreadable.items():
        lines.append(f"{name:<22} {'-':<17} FAIL ({why})")
    for path, problems in verification.repositories.items():
        state = "not found, not checked" if problems is None else f"FAIL ({'; '.join(problems[:3])})" if problems \
            else "pass (every file as 'clfpipe repo' wrote it)"
        lines.append(f"repository {path}: {state}")
    return "\n".join(lines)
