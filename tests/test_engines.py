"""The torch engines on the CPU: an AOTInductor package of the folded graph exported, load-checked
and gated; served by the embedded Triton beside ONNX Runtime; chosen by profile; and the fallbacks
when a package will not compile or load."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import clfpipe.pipeline as pipeline
import clfpipe.runtime.torch_engine as torch_engine
from clfpipe.cli import main
from clfpipe.contract.dataset import Split
from clfpipe.contract.engines import Variant
from clfpipe.contract.errors import ExportError, ServeError
from clfpipe.contract.manifest import RunDir
from clfpipe.export.pt2_export import export_pt2
from clfpipe.serve.client import Classifier
from clfpipe.serve.repository import build_repository
from clfpipe.serve.server import Ports, served_engines, server_status, start_server, stop_server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pt2_run(trained_run, tmp_path_factory):
    """A copy of the demo run with the plain served graph also as an AOTInductor package (~40 s)."""
    import shutil

    run = tmp_path_factory.mktemp("pt2") / "run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("model_repository*"))
    export_pt2(run, data_dir=RunDir(trained_run).data_dir(RunDir(trained_run).read()))
    return run


def test_the_package_is_gated_and_verified_with_a_profile(pt2_run, capsys):
    manifest = RunDir(pt2_run).read()
    entry = manifest.artifact("aoti-pre")
    assert entry["gate"]["passed"] and entry["gate"]["top1_agreement"] == 1.0 and entry["device"] == "cpu"
    assert (pt2_run / "model-pre.pt2").is_file() and entry["variant"] == Variant("fp32", True, False, "aoti").to_dict()
    assert main(["verify", "--run", str(pt2_run)]) == 0
    report = json.loads((pt2_run / "verify.json").read_text())
    row = next(r for r in report["results"] if r["artifact"] == "aoti-pre")
    assert row["runtime"] == "aoti-cpu" and row["passed"] and row["seconds_per_batch"] > 0
    assert "aoti-pre" in capsys.readouterr().out


def test_half_precision_needs_cuda(pt2_run):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is here: the fp16 package is the GPU check's")
    with pytest.raises(ExportError, match="expected a CUDA device"):
        export_pt2(pt2_run, precision="fp16")


def test_triton_serves_the_package_with_the_same_answers(pt2_run, tmp_path):
    repo = build_repository(pt2_run, tmp_path / "repo", engines={"backbone": "aoti"})
    assert served_engines(repo) == {"backbone": "aoti", "backbone_tta": "onnx"}
    state = tmp_path / "state"
    info = start_server(repo, state, ports=Ports.free(), supervise=False)
    try:
        valid = sorted(RunDir(pt2_run).data_dir(RunDir(pt2_run).read()).glob("valid/*/*.jpg"))[:12]
        agreement = pipeline.served_agreement(pt2_run, Classifier(info.http_url, "http"), valid)
        assert agreement.passed and agreement.top1_agreement == 1.0, agreement.summary()
        assert server_status(state)[1] == "ready"
    finally:
        stop_server(state)


def test_auto_picks_the_faster_engine_by_profile(pt2_run, monkeypatch):
    timings = {"onnx-pre": 0.2, "aoti-pre": 0.1}
    monkeypatch.setattr(pipeline, "profile", lambda run, manifest, name, batch: timings.get(name))
    assert pipeline.choose_engines(pt2_run) == {"backbone": "aoti", "backbone_tta": "onnx"}
    timings.update({"onnx-pre": 0.05})
    assert pipeline.choose_engines(pt2_run)["backbone"] == "onnx"


def test_a_package_that_will_not_compile_falls_back_to_the_exported_program(pt2_run, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", broken)
    manifest = export_pt2(pt2_run, fold_tta=True, data_dir=RunDir(pt2_run).data_dir(RunDir(pt2_run).read()))
    entry = manifest.artifact("torch-pre-tta")
    assert entry["gate"]["passed"] and "no C++ compiler" in entry["aoti_not_kept"]
    assert (pt2_run / "model-pre-tta.ep.pt2").is_file() and not (pt2_run / "model-pre-tta.pt2").exists()


def test_serve_up_refuses_a_package_that_crashes_its_loader(pt2_run, tmp_path, monkeypatch):
    repo = build_repository(pt2_run, tmp_path / "repo", engines={"backbone": "aoti"})
    monkeypatch.setattr(torch_engine, "load_check", lambda engine, path, inputs: (None, "loading it failed (killed by signal 11)"))
    with pytest.raises(ServeError, match="backbone's AOTInductor package does not load here: loading it failed \\(killed by signal 11\\)"):
        start_server(repo, tmp_path / "state", ports=Ports.free())


def test_the_child_process_check_reports_a_crash(tmp_path):
    outputs, why = torch_engine.load_check("aoti", tmp_path / "missing.pt2", np.zeros((1, 8, 8, 3), np.uint8))
    assert outputs is None and why.startswith("loading it failed (exit 1)")


def test_the_fused_decode_step_serves_image_bytes_on_the_engines_device(pt2_run, tmp_path, caplog):
    """decode=nvjpeg with the torch engine: one step decodes and runs the exported program (on this
    CPU, torchvision's decoder stands in for nvJPEG); a bad image fails its own request only."""
    export_pt2(pt2_run, data_dir=RunDir(pt2_run).data_dir(RunDir(pt2_run).read()), aoti=False)
    assert RunDir(pt2_run).read().artifact("torch-pre")["gate"]["passed"]
    repo = build_repository(pt2_run, tmp_path / "repo", engines={"backbone": "torch"}, decode="nvjpeg")
    recorded = json.loads((repo / "clfpipe_repository.json").read_text())
    assert recorded["decode"] == "nvjpeg" and recorded["fused"] == ["backbone_image"]
    state = tmp_path / "state"
    info = start_server(repo, state, ports=Ports.free(), supervise=False)
    try:
        valid = sorted(RunDir(pt2_run).data_dir(RunDir(pt2_run).read()).glob("valid/*/*.jpg"))[:24]
        client = Classifier(info.grpc_url, "grpc")
        agreement = pipeline.served_agreement(pt2_run, client, valid, decode="nvjpeg")  # on the decoder's own pixels
        assert agreement.passed and agreement.top1_agreement == 1.0, agreement.summary()
        decoded = pipeline.decoder_agreement(pt2_run, valid, "nvjpeg")
        assert decoded.passed and decoded.images == 24, decoded.summary()  # on this CPU the same libjpeg-turbo: equal
        classes = RunDir(pt2_run).read().classes
        split = Split(tuple(valid), tuple(classes.index(f.parent.name) for f in valid), tuple(classes))
        rows = pipeline.served_rows(pipeline.Reference(pt2_run, split), info.grpc_url, "grpc")  # what verify --served reads
        names = [r.artifact for r in rows]
        assert names[:2] == ["classifier", "classifier_pixels"] and names[-1] == "nvjpeg vs Pillow"
        assert all(r.result.passed and r.result.images == 24 for r in rows)
        assert ("the server decodes with nvJPEG and this host has no CUDA" in caplog.text) != torch.cuda.is_available()
        with pytest.raises(ServeError, match="not an image"):
            client.probabilities([valid[0].read_bytes(), b"junk"])
        assert client.probabilities([valid[1].read_bytes()]).shape == (1, len(RunDir(pt2_run).read().classes))
        assert server_status(state)[1] == "ready"
    finally:
        stop_server(state)
