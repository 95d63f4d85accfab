import json

import pytest

from clfpipe.contract.errors import ManifestError
from clfpipe.contract.manifest import RunDir, new_manifest, sha256_file
from clfpipe.contract.recipe import load_recipe


def _manifest(tmp_path):
    return new_manifest(load_recipe(None), ["a", "b", "c"], tmp_path / "data", tmp_path / "run")


def test_round_trip_with_artifact(tmp_path):
    run = RunDir(tmp_path / "run")
    (tmp_path / "run").mkdir()
    weights = tmp_path / "run" / "model.pt"
    weights.write_bytes(b"weights")
    manifest = _manifest(tmp_path).with_artifact("checkpoint", run.path, weights, stage="train", versions={"torch": "x"})
    manifest = manifest.with_stage("train", {"valid_accuracy": 0.9})
    run.write(manifest)
    back = run.read()
    assert back.classes == ["a", "b", "c"]
    assert back.recipe == load_recipe(None)
    assert back.preprocess == load_recipe(None).preprocess_spec()
    entry = back.artifact("checkpoint")
    assert entry["sha256"] == sha256_file(weights) and entry["path"] == "model.pt" and entry["stage"] == "train"
    assert run.artifact_path(back, "checkpoint") == weights
    assert back.stage("train")["valid_accuracy"] == 0.9


def test_changed_artifact_is_detected(tmp_path):
    run = RunDir(tmp_path)
    weights = tmp_path / "model.pt"
    weights.write_bytes(b"weights")
    run.write(_manifest(tmp_path).with_artifact("checkpoint", tmp_path, weights, stage="train", versions={}))
    weights.write_bytes(b"tampered")
    with pytest.raises(ManifestError, match="changed since train wrote it"):
        run.artifact_path(run.read(), "checkpoint")
    weights.unlink()
    with pytest.raises(ManifestError, match="artifact 'checkpoint' missing"):
        run.artifact_path(run.read(), "checkpoint")


def test_missing_run_and_manifest(tmp_path):
    with pytest.raises(ManifestError, match="run directory not found"):
        RunDir(tmp_path / "nope").read()
    with pytest.raises(ManifestError, match="has no manifest.json"):
        RunDir(tmp_path).read()


def test_corrupt_and_invalid_manifests(tmp_path):
    run = RunDir(tmp_path)
    run.manifest_path.write_text("{not json")
    with pytest.raises(ManifestError, match="corrupt manifest, not valid JSON"):
        run.read()
    data = _manifest(tmp_path).data
    for change, message in (
        ({"schema_version": 99}, "expected schema_version 1, got 99"),
        ({"classes": ["only"]}, "at least 2 names"),
        ({"recipe": {"model": {"arch": "vgg"}}}, "invalid recipe"),
    ):
        run.manifest_path.write_text(json.dumps({**data, **change}))
        with pytest.raises(ManifestError, match=message):
            run.read()
    run.manifest_path.write_text(json.dumps({k: v for k, v in data.items() if k != "artifacts"}))
    with pytest.raises(ManifestError, match="missing keys artifacts"):
        run.read()


def test_missing_stage_and_artifact_name_what_exists(tmp_path):
    manifest = _manifest(tmp_path)
    with pytest.raises(ManifestError, match="no 'export' stage"):
        manifest.stage("export")
    with pytest.raises(ManifestError, match="no artifact 'onnx'"):
        manifest.artifact("onnx")
