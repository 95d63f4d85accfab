"""The precision ladder and folded graphs on the demo run (CPU), and TensorRT where it exists."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
import torch

from clfpipe.cli import main
from clfpipe.contract.engines import Variant
from clfpipe.contract.errors import ExportError, RecipeError
from clfpipe.contract.manifest import RunDir, sha256_file
from clfpipe.contract.preprocess import load_pixels, normalize
from clfpipe.export.onnx_export import calibration_count, calibration_files, export_onnx, validation_split
from clfpipe.export.quantize import even_batch, quantize_int8
from clfpipe.nn.reference import load_run_model
from clfpipe.runtime.ort import make_session
from clfpipe.runtime.ort import run_graph as ort_logits
from clfpipe.runtime.tensorrt import check_engine_platform, trt_status
from clfpipe.train.evaluate import deterministic_tta

pytestmark = pytest.mark.slow

LADDER = [Variant("fp16"), Variant("int8"), Variant("int8-trt"), Variant("int8", True, True)]


@pytest.fixture(scope="module")
def ladder_run(trained_run, tmp_path_factory):
    """A copy of the demo run with every precision exported (about a minute)."""
    run = tmp_path_factory.mktemp("ladder") / "run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("model_repository*"))
    for variant in LADDER:
        export_onnx(run, variant=variant)
    return run


@pytest.mark.parametrize("variant", [Variant(), Variant("fp32", True), Variant("fp32", True, True), *LADDER], ids=lambda v: v.name)
def test_each_variant_exports_checks_and_passes_its_gate(ladder_run, variant):
    manifest = RunDir(ladder_run).read()
    entry = manifest.artifact(variant.name)
    assert entry["gate"]["passed"] and entry["variant"] == variant.to_dict()
    model = onnx.load(str(ladder_run / entry["path"]))
    onnx.checker.check_model(model)
    (inp,), (out,) = model.graph.input, model.graph.output
    assert inp.name == "input" and out.name == variant.output_name
    expected = onnx.TensorProto.UINT8 if variant.fold_preprocess else onnx.TensorProto.FLOAT
    assert inp.type.tensor_type.elem_type == expected
    assert out.type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # fp16 keeps float32 I/O
    assert json.loads({p.key: p.value for p in model.metadata_props}["variant"]) == variant.to_dict()
    if variant.precision.startswith("int8"):
        assert any(n.op_type == "QuantizeLinear" for n in model.graph.node)
        assert entry["calibration_images"] == 64


def test_folded_preprocessing_equals_the_unfolded_model(trained_run):
    manifest = RunDir(trained_run).read()
    files = list(validation_split(RunDir(trained_run), manifest, None).files)
    pixels = load_pixels(files, manifest.preprocess)
    folded = ort_logits(make_session(trained_run / "model-pre.onnx"), pixels)
    unfolded = ort_logits(make_session(trained_run / "model.onnx"), normalize(pixels, manifest.preprocess))
    np.testing.assert_allclose(folded, unfolded, atol=1e-4 * np.abs(unfolded).max() + 1e-5)
    assert (folded.argmax(1) == unfolded.argmax(1)).all()


def test_folded_tta_equals_the_training_side_deterministic_tta(trained_run):
    run = RunDir(trained_run)
    manifest = run.read()
    split = validation_split(RunDir(trained_run), manifest, None)
    served = ort_logits(make_session(trained_run / "model-pre-tta.onnx"), load_pixels(split.files, manifest.preprocess))
    training = deterministic_tta(load_run_model(run, manifest), split, spec=manifest.preprocess, batch_size=32, device=torch.device("cpu"))
    np.testing.assert_allclose(served, training, atol=1e-5)
    assert np.allclose(served.sum(1), 1.0, atol=1e-5)


def test_int8_calibration_is_deterministic(trained_run, tmp_path):
    manifest = RunDir(trained_run).read()
    from clfpipe.contract.dataset import scan_data

    train = scan_data(RunDir(trained_run).data_dir(manifest), "train", classes=tuple(manifest.classes), verify=False)
    files = calibration_files(train, 16, seed=0)
    assert files == calibration_files(train, 16, seed=0) and files != calibration_files(train, 16, seed=1)
    inputs = Variant("int8").input_form.prepare(load_pixels(files, manifest.preprocess), manifest.preprocess)
    for name in ("a.onnx", "b.onnx"):
        quantize_int8(trained_run / "model.onnx", tmp_path / name, inputs, symmetric_activations=False)
    assert sha256_file(tmp_path / "a.onnx") == sha256_file(tmp_path / "b.onnx")


@pytest.mark.parametrize("method", ["percentile", "entropy", "minmax"])
def test_int8_calibrates_on_any_number_of_images(trained_run, tmp_path, method):
    """20 images (not a multiple of 16) and a prime 7: every batch one size, as ORT's histogram
    calibrators need; a count 16 divides keeps its batches of 16."""
    assert [even_batch(n) for n in (64, 20, 7, 1, 0)] == [16, 10, 7, 1, 1]
    manifest = RunDir(trained_run).read()
    from clfpipe.contract.dataset import scan_data

    train = scan_data(RunDir(trained_run).data_dir(manifest), "train", classes=tuple(manifest.classes), verify=False)
    pixels = load_pixels(calibration_files(train, 20, seed=0), manifest.preprocess)
    inputs = Variant("int8").input_form.prepare(pixels, manifest.preprocess)
    assert calibration_count(manifest, None) == 64 and calibration_count(manifest, 7) == 7
    with pytest.raises(RecipeError, match=r"export.calibration_images: expected a finite number in \[1, 100000\], got 0"):
        calibration_count(manifest, 0)  # it fell back to the recipe's 64 unsaid
    for count in (20, 7):
        quantize_int8(trained_run / "model.onnx", tmp_path / f"{count}.onnx", inputs[:count], symmetric_activations=False,
                      method=method)
        assert (tmp_path / f"{count}.onnx").stat().st_size > 0


def test_verify_passes_then_fails_when_a_gate_is_tightened(ladder_run, tmp_path, capsys):
    assert main(["verify", "--run", str(ladder_run)]) == 0
    out = capsys.readouterr().out
    for variant in LADDER:
        assert variant.name in out
    report = json.loads((ladder_run / "verify.json").read_text())
    assert report["passed"] and {r["runtime"] for r in report["results"]} >= {"onnxruntime-cpu"}
    tight = tmp_path / "tight"
    shutil.copytree(ladder_run, tight)
    data = json.loads((tight / "manifest.json").read_text())
    data["recipe"]["export"].update(rtol=0.0, atol=0.0)
    (tight / "manifest.json").write_text(json.dumps(data))
    assert main(["verify", "--run", str(tight)]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_unknown_precision_is_refused():
    with pytest.raises(ExportError, match="expected one of fp32, fp16, int8, int8-trt, got 'int4'"):
        Variant("int4")


def test_engine_from_another_platform_is_refused_with_how_to_rebuild(tmp_path):
    here = {"tensorrt": "11.0.0", "gpu": "NVIDIA H100", "compute_capability": "9.0"}
    check_engine_platform(dict(here), here, tmp_path, "onnx-fp16")
    with pytest.raises(ExportError, match=r"tensorrt '10\.3\.0' here '11\.0\.0'.*clfpipe export trt --run .* --variant onnx-fp16"):
        check_engine_platform({**here, "tensorrt": "10.3.0"}, here, tmp_path, "onnx-fp16")
    with pytest.raises(ExportError, match="gpu 'NVIDIA A10'"):
        check_engine_platform({**here, "gpu": "NVIDIA A10"}, here, tmp_path, "onnx")


@pytest.mark.skipif(trt_status()[0], reason="TensorRT is installed here: the build test below runs instead")
def test_export_trt_without_tensorrt_says_so_in_one_line(trained_run, capsys):
    assert main(["export", "trt", "--run", str(trained_run)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot use TensorRT" in err


@pytest.mark.parametrize(("flags", "expected"), [
    (["--min-batch", "0"], "expected 1 <= min-batch <= opt-batch <= max-batch <= 4096, got 0, 8, 32"),
    (["--max-batch", "100000"], "got 1, 8, 100000"),
    (["--variant", "checkpoint"], "--variant: expected an ONNX variant (onnx"),
])
def test_export_trt_checks_what_it_is_given_before_tensorrt(trained_run, capsys, flags, expected):
    """These were 'TensorRT is not installed' without it, and a checkpoint went to TensorRT's ONNX
    parser with it; a batch of 100,000 went to the builder."""
    assert main(["export", "trt", "--run", str(trained_run), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err


@pytest.mark.skipif(not trt_status()[0], reason=f"TensorRT unavailable: {trt_status()[1]}")
def test_tensorrt_engine_builds_and_agrees(ladder_run):
    from clfpipe.export.verify import verify_run

    assert main(["export", "trt", "--run", str(ladder_run), "--variant", "onnx-fp16", "--max-batch", "32"]) == 0
    verification = verify_run(ladder_run)
    assert verification.passed and any(r.runtime == "tensorrt" for r in verification.rows)


def test_a_float_variants_gate_never_holds_the_whole_sets_float32_copy(trained_run):
    """check_variant made the float32 input of every validation image at once, for PyTorch and again
    for ONNX Runtime: 600 KB an image at 224, about 6 GB for 10,000 images."""
    import tracemalloc

    from clfpipe.export.onnx_export import check_variant

    run = RunDir(trained_run)
    manifest = run.read()
    split = validation_split(run, manifest, None)
    # 540 images: a chunk's float32 input and its temporaries are a fixed ~9.5 MB here, the whole set's copy 27 MB
    pixels = np.concatenate([load_pixels(split.files, manifest.preprocess)] * 6)
    split6 = type(split)(split.files * 6, split.labels * 6, split.classes)
    model = load_run_model(run, manifest)
    tracemalloc.start()
    try:
        result = check_variant(run.artifact_path(manifest, "onnx"), model, manifest, Variant(), split=split6, pixels=pixels)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert result.passed and result.images == 540
    assert peak < normalize(pixels, manifest.preprocess).nbytes / 2


def test_verify_never_holds_the_whole_sets_float32_copy(run_copy, tmp_path):
    """verify made each float variant's input for every image at once (its runners took whole
    inputs): 600 KB an image at 224, the rest of the gates' memory bound undone."""
    import tracemalloc

    from clfpipe.export.verify import verify_run

    manifest = RunDir(run_copy).read()
    valid = RunDir(run_copy).data_dir(manifest) / "valid"
    images = tmp_path / "valid"
    for copy in range(6):  # 540 images, by links: the set's float32 copy (27 MB) outweighs a chunk's
        for path in valid.glob("*/*.jpg"):
            (images / path.parent.name).mkdir(parents=True, exist_ok=True)
            (images / path.parent.name / f"{copy}-{path.name}").symlink_to(path)
    pixels = load_pixels(sorted(images.glob("*/*.jpg")), manifest.preprocess)
    tracemalloc.start()
    try:
        verification = verify_run(run_copy, images)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert verification.passed and verification.images == 540
    assert "onnx" in {r.artifact for r in verification.rows}  # the float32-input variant
    assert peak < pixels.nbytes + normalize(pixels, manifest.preprocess).nbytes / 2
