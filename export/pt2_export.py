"""``clfpipe export pt2``: the folded graph (uint8 pixels in, normalisation and, where asked, the
TTA views inside) through ``torch.export`` and AOTInductor into one package, compiled for this
host's device (CUDA when there is one), at fp32 or, on CUDA, fp16/bf16.

The package is loaded and run in a child process first (an AOTInductor package has crashed the
process that loaded it); when that fails the exported program itself is kept instead (engine
``torch``: ``torch.export.load`` in the server). Either is gated against PyTorch fp32 like every
ONNX variant, and recorded in the manifest only when it passes.
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path

import numpy as np
import torch

from clfpipe.contract import tensors
from clfpipe.contract.engines import ENGINES, Variant, in_chunks
from clfpipe.contract.errors import ExportError
from clfpipe.contract.lock import holding_run
from clfpipe.contract.manifest import Manifest, RunDir, library_versions
from clfpipe.contract.preprocess import load_pixels
from clfpipe.export.onnx_export import gate_variant, validation_split
from clfpipe.nn.folded import Folded, example_input
from clfpipe.nn.reference import load_run_model, reference_outputs
from clfpipe.runtime.torch_engine import device_here, load, load_check

log = logging.getLogger(__name__)
PT2_VERSIONS = ("torch", "torchvision")


def _program(model: torch.nn.Module, manifest: Manifest, variant: Variant, device: torch.device,
             max_batch: int) -> torch.export.ExportedProgram:
    dtype = getattr(torch, ENGINES[variant.engine].torch_dtype[variant.precision])  # type: ignore[index]
    folded = Folded(copy.deepcopy(model), manifest.preprocess, variant, manifest.recipe.multi_label, dtype).to(device).eval()
    example = example_input(variant, manifest.preprocess.crop).to(device)
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    with torch.no_grad():
        return torch.export.export(folded, (example,), dynamic_shapes=({0: batch},))


def _staging(run_dir: Path, variant: Variant) -> Path:
    """A hidden file beside the final one, still ending in .pt2 (torch's loaders insist)."""
    return run_dir / ("." + variant.file_name.removesuffix(".pt2") + ".partial.pt2")


def _program_only(program: torch.export.ExportedProgram, variant: Variant, run_dir: Path,
                  inputs: np.ndarray) -> tuple[Variant, Path, np.ndarray]:
    """The exported program itself (engine torch): staged, and its outputs on `inputs`."""
    kept = variant.on("torch")
    staging = _staging(run_dir, kept)
    torch.export.save(program, str(staging))
    return kept, staging, in_chunks(load("torch", staging), inputs)


def _aoti_or_program(program: torch.export.ExportedProgram, variant: Variant, run_dir: Path,
                     inputs: np.ndarray) -> tuple[Variant, Path, np.ndarray, str]:
    """(what was kept, its staged file, its outputs on `inputs`, why the package was not kept or "")."""
    staging = _staging(run_dir, variant)
    try:
        torch._inductor.aoti_compile_and_package(program, package_path=str(staging))
        outputs, why = load_check("aoti", staging, inputs)
    except Exception as exc:  # inductor raises many types; what matters is that it did not compile
        outputs, why = None, f"AOTInductor could not compile it ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    if outputs is not None:
        return variant, staging, outputs, ""
    staging.unlink(missing_ok=True)
    log.warning("export pt2: the AOTInductor package of %s was not kept: %s; keeping the exported program (%s) instead",
                variant.name, why, variant.on("torch").name)
    return (*_program_only(program, variant, run_dir, inputs), why)


@holding_run("export pt2")
def export_pt2(run_dir: Path, *, precision: str = "fp32", fold_tta: bool = False, data_dir: Path | None = None,
               aoti: bool = True) -> Manifest:
    """Export, load-check and gate one torch variant (uint8 pixels in), then record it. `aoti`
    False: keep the exported program without compiling a package (seconds instead of minutes)."""
    variant = Variant(precision, fold_preprocess=True, fold_tta=fold_tta, engine="aoti")
    device = device_here()
    if precision != "fp32" and device.type != "cuda":
        raise ExportError(f"export pt2 --precision {precision}: expected a CUDA device (the half-precision kernels are the "
                          "GPU's), got the CPU; export fp32 here")
    run = RunDir(run_dir)
    manifest = run.read()
    split = validation_split(run, manifest, data_dir)
    pixels = load_pixels(split.files, manifest.preprocess)
    model = load_run_model(run, manifest)
    inputs = variant.input_form.prepare(pixels, manifest.preprocess)
    start = time.perf_counter()
    log.info("export pt2: %s on %s (torch.export%s) ...", variant.name, device, ", then AOTInductor" if aoti else "")
    program = _program(model, manifest, variant, device, max(64, manifest.recipe.serve.max_batch_size))
    if aoti:
        kept, staging, outputs, why = _aoti_or_program(program, variant, Path(run_dir), inputs)
    else:
        (kept, staging, outputs), why = _program_only(program, variant, Path(run_dir), inputs), ""
    try:
        result = gate_variant(kept, manifest, reference=reference_outputs(model, manifest, kept, pixels), test=outputs,
                              labels=np.asarray(split.labels))
        if not result.passed:
            raise ExportError(f"{kept.name} fails its gate against PyTorch: {result.summary()}")
        final = Path(run_dir) / kept.file_name
        staging.replace(final)
    finally:
        staging.unlink(missing_ok=True)
    seconds = time.perf_counter() - start
    manifest = manifest.with_artifact(
        kept.name, Path(run_dir), final, stage="export", versions=library_versions(PT2_VERSIONS), variant=kept.to_dict(),
        device=str(device), gpu=torch.cuda.get_device_name() if device.type == "cuda" else None,
        inputs={tensors.INPUT: {"shape": kept.input_form.shape(manifest.preprocess.crop), "dtype": kept.input_form.dtype}},
        outputs={kept.output_name: ["batch", len(manifest.classes)]}, gate=result.to_dict(), aoti_not_kept=why or None)
    previous = manifest.data["stages"].get("export", {})
    variants = {**previous.get("variants", {}), kept.name: {"gate": result.to_dict(), "seconds": round(seconds, 2)}}
    manifest = manifest.with_stage("export", {**previous, "variants": variants})
    run.write(manifest)
    log.info("export pt2: %s (%s) in %.1fs; PyTorch fp32 vs %s on %s", final, kept.engine, seconds, kept.name, result.summary())
    return manifest
