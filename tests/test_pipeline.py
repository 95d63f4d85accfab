"""End to end on CPU: demo data -> train -> export -> repo -> a real tritonserver -> HTTP and gRPC."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
import torch
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from clfpipe.cli import main
from clfpipe.contract.dataset import scan_split
from clfpipe.contract.engines import Variant
from clfpipe.contract.errors import ExportError, ManifestError, ServeError
from clfpipe.contract.manifest import Manifest, RunDir
from clfpipe.contract.probabilities import softmax
from clfpipe.contract.recipe import ModelConfig
from clfpipe.export.onnx_export import check_variant, export_onnx, write_onnx
from clfpipe.nn.models import build_model
from clfpipe.nn.reference import files_to_batch, load_run_model, torch_logits
from clfpipe.pipeline import served_agreement
from clfpipe.serve.client import Classifier
from clfpipe.serve.server import Ports, _group_alive, server_status, start_server
from tests.conftest import free_port

pytestmark = pytest.mark.slow


def _valid(run):
    manifest = RunDir(run).read()
    return scan_split(RunDir(run).data_dir(manifest), "valid", tuple(manifest.classes))


def test_trained_model_beats_chance_and_untrained_is_at_chance(trained_run):
    manifest = RunDir(trained_run).read()
    assert manifest.stage("train")["valid_accuracy"] >= 0.6  # chance is 1/3
    valid = _valid(trained_run)
    untrained = build_model(ModelConfig(), 3).eval()
    logits = torch_logits(untrained, files_to_batch(valid.files, manifest.preprocess))
    assert (logits.argmax(1) == np.array(valid.labels)).mean() < 0.5


def test_run_directory_describes_itself(trained_run):
    manifest = RunDir(trained_run).read()
    assert manifest.classes == ["checker", "horizontal", "vertical"]
    assert manifest.data["preprocess"]["crop"] == 64
    for name, stage in (("checkpoint", "train"), ("onnx", "export")):
        entry = manifest.artifact(name)
        assert entry["stage"] == stage and len(entry["sha256"]) == 64 and entry["versions"]["torch"].startswith("2.14")
    state = torch.load(trained_run / "model.pt", weights_only=True)
    assert isinstance(state, dict) and "head.8.weight" in state
    assert (trained_run / "metrics.csv").read_text().count("\n") == 1 + manifest.stage("train")["epochs"]
    assert (trained_run / "recipe.resolved.toml").is_file()
    for name in ("schedule.png", "lr_find_stage0.png", "report/index.html", "report/confusion_matrix.png"):
        assert (trained_run / name).is_file(), name
    assert not (trained_run / "train_state.pt").exists()
    figures = manifest.stage("train")
    assert set(figures["accuracy"]) == {"plain", "tta_fastai", "tta_deterministic"}
    assert figures["lr_finds"][0]["stage"] == "head_precomputed"
    assert len(figures["stage_lrs"]) == 4


def test_tta_policies_repeat_exactly(trained_run):
    from clfpipe.train.evaluate import deterministic_tta, fastai_tta, predict_probs

    run = RunDir(trained_run)
    manifest = run.read()
    model, valid, spec, cpu = load_run_model(run, manifest), _valid(trained_run), manifest.preprocess, torch.device("cpu")
    common = dict(spec=spec, batch_size=32, device=cpu)
    plain = predict_probs(model, valid, **common)
    first = fastai_tta(model, valid, **common, augment="side_on", n_aug=4, seed=0, plain=plain)
    np.testing.assert_array_equal(first, fastai_tta(model, valid, **common, augment="side_on", n_aug=4, seed=0, plain=plain))
    np.testing.assert_array_equal(deterministic_tta(model, valid, **common), deterministic_tta(model, valid, **common))
    assert not np.array_equal(first, plain)


def test_lr_find_command_restores_the_run(run_copy, capsys):
    before = (run_copy / "model.pt").read_bytes()
    assert main(["lr-find", "--run", str(run_copy), "--stage", "0"]) == 0
    out = capsys.readouterr().out
    assert {line.split()[0] for line in out.strip().splitlines()[-3:]} == {"valley", "steep", "minimum"}
    assert (run_copy / "lr_find_stage0.json").is_file() and (run_copy / "lr_find_stage0.png").is_file()
    assert (run_copy / "model.pt").read_bytes() == before
    stages = RunDir(run_copy).read().recipe.stages
    assert main(["lr-find", "--run", str(run_copy), "--stage", str(len(stages))]) == 2
    assert capsys.readouterr().err == (f"clfpipe: error: --stage: expected one of the run's stages, 0 to {len(stages) - 1} ("
                                       + ", ".join(f"{i} {s.name}" for i, s in enumerate(stages)) + f"), got {len(stages)}\n")


def test_lr_find_sweeps_from_the_weights_the_stage_started_from(run_copy):
    from clfpipe.contract.manifest import stage_start
    from clfpipe.train.loop import lr_find_for_run, stage_start_model

    run = RunDir(run_copy)
    manifest = run.read()
    start = stage_start_model(run, manifest, 2).state_dict()
    saved = torch.load(run_copy / stage_start(2)[1], weights_only=True)
    final = torch.load(run_copy / "model.pt", weights_only=True)
    assert all(torch.equal(start[k], saved[k]) for k in saved)
    assert not all(torch.equal(start[k], final[k]) for k in final)  # not the trained weights
    result = lr_find_for_run(run_copy, 2)
    assert result.lrs[0] == pytest.approx(manifest.recipe.lr_find.start) and len(result.lrs) > 20
    assert all(result.lrs[0] <= lr <= result.lrs[-1] for lr in result.suggestions.values()), result.suggestions


def test_onnx_is_named_dynamic_and_passes_the_gate(trained_run):
    manifest = RunDir(trained_run).read()
    model = onnx.load(str(trained_run / "model.onnx"))
    onnx.checker.check_model(model)
    (inp,), (out,) = model.graph.input, model.graph.output
    assert inp.name == "input" and out.name == "logits"
    assert inp.type.tensor_type.shape.dim[0].dim_param  # symbolic batch
    assert json.loads({p.key: p.value for p in model.metadata_props}["classes"]) == manifest.classes
    figures = manifest.stage("export")["agreement"]
    assert figures["passed"] and figures["top1_agreement"] == 1.0 and figures["images"] == 90
    assert figures["max_abs_diff"] <= figures["tolerance"]


def test_gate_rejects_a_perturbed_model(trained_run, tmp_path):
    run = RunDir(trained_run)
    manifest = run.read()
    model = load_run_model(run, manifest)
    perturbed = load_run_model(run, manifest)
    with torch.no_grad():
        perturbed.head[8].bias[0] += 0.05  # one weight of the last layer
    path = tmp_path / "perturbed.onnx"
    write_onnx(perturbed, path, torch.zeros(2, 3, 64, 64), opset=20, metadata={})
    result = check_variant(path, model, manifest, Variant(), split=_valid(trained_run))
    assert not result.passed and result.max_abs_diff == pytest.approx(0.05, rel=1e-3)


def test_failed_export_leaves_the_manifest_as_it_was(run_copy):
    manifest_path = run_copy / "manifest.json"
    data = json.loads(manifest_path.read_text())
    data["recipe"]["export"].update(rtol=0.0, atol=0.0)  # an impossible gate
    manifest_path.write_text(json.dumps(data))
    (run_copy / "model.onnx").unlink()
    before = manifest_path.read_bytes()
    with pytest.raises(ExportError, match="onnx fails its gate against PyTorch: 90 images"):
        export_onnx(run_copy)
    assert manifest_path.read_bytes() == before
    assert not (run_copy / "model.onnx").exists() and not list(run_copy.glob(".*partial"))


def test_run_without_checkpoint_is_refused(run_copy, capsys):
    (run_copy / "model.pt").unlink()
    with pytest.raises(ManifestError, match="artifact 'checkpoint' missing"):
        export_onnx(run_copy)
    assert main(["repo", "--run", str(run_copy), "--out", str(run_copy / "r")]) == 0  # the ONNX is intact
    assert main(["export", "onnx", "--run", str(run_copy), "--precision", "fp16"]) == 2
    assert "artifact 'checkpoint' missing" in capsys.readouterr().err


def test_generated_repository_parses(trained_run, server):
    for path in (trained_run / "model_repository").glob("*/config.pbtxt"):
        config = text_format.Parse(path.read_text(), mc.ModelConfig())
        assert config.name == path.parent.name
    assert (trained_run / "model_repository" / "classifier" / "labels.txt").read_text().split() == RunDir(trained_run).read().classes


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_triton_matches_pytorch(trained_run, server, protocol):
    url = server.http_url if protocol == "http" else server.grpc_url
    client = Classifier(url, protocol)
    valid = _valid(trained_run)
    agreement = served_agreement(trained_run, client, list(valid.files))
    assert agreement.passed, agreement.summary()
    assert agreement.images == 90 and agreement.top1_agreement == 1.0
    manifest = RunDir(trained_run).read()
    assert agreement.accuracy == agreement.accuracy_ref == pytest.approx(manifest.stage("train")["accuracy"]["plain"])
    reference = softmax(torch_logits(load_run_model(RunDir(trained_run), manifest), files_to_batch(valid.files[:6], manifest.preprocess)))
    labels = [p.label for p in client.predict(valid.files[:6])]
    assert labels == [manifest.classes[i] for i in reference.argmax(1)]


def _served_rows(out: str) -> list[list[str]]:
    """verify's table rows of the server (runtime triton-http or triton-grpc), split into columns."""
    return [row for row in (line.split() for line in out.splitlines()) if len(row) > 1 and row[1].startswith("triton-")]


def test_verify_served_checks_the_running_server_against_this_runs_pytorch(run_copy, server, server_state, capsys):
    """`verify --served` puts the server's answers beside the variants, judged against the run's
    own PyTorch model: a user's run had no command that checked what Triton serves."""
    args = ["verify", "--run", str(run_copy), "--served", "--state-dir", str(server_state)]
    assert main([*args, "--protocol", "grpc"]) == 0
    served = _served_rows(capsys.readouterr().out)
    assert [row[:2] for row in served] == [[name, "triton-grpc"] for name in ["classifier", "classifier_pixels", "classifier_tta", "classifier_tta_pixels"]]
    assert all(row[2] == "1.0000" and float(row[7]) > 0 and "pass" in row for row in served)  # agreement, ms/batch
    report = json.loads((run_copy / "verify.json").read_text())
    assert [r["artifact"] for r in report["results"][:4]] == ["classifier", "classifier_pixels", "classifier_tta", "classifier_tta_pixels"]
    assert report["results"][0]["images"] == 90 and report["results"][0]["seconds_per_batch"] > 0

    run = RunDir(run_copy)  # the same server against a run whose head weights differ: its rows fail
    manifest = run.read()
    state = torch.load(run_copy / "model.pt", weights_only=True)
    torch.manual_seed(0)
    torch.save({k: v + 0.5 * torch.randn_like(v) if k.startswith("head.") and k.endswith("weight") else v
                for k, v in state.items()}, run_copy / "model.pt")
    run.write(manifest.with_artifact("checkpoint", run_copy, run_copy / "model.pt", stage="train",
                                     versions=manifest.artifact("checkpoint")["versions"]))
    assert main(args) == 1
    served = _served_rows(capsys.readouterr().out)
    assert len(served) == 4 and all("FAIL" in row for row in served)

    assert main([*args[:-2], "--url", f"127.0.0.1:{free_port()}"]) == 2
    assert "cannot reach Triton" in capsys.readouterr().err
    data = run.read().data  # a run whose classes are not the served ones: refused before any check
    run.write(Manifest({**data, "classes": data["classes"][::-1]}))
    assert main(args) == 2
    assert capsys.readouterr().err.strip().endswith("is it serving another run?")


def test_cli_predict_json(trained_run, server, capsys):
    valid_dir = _valid(trained_run).files[0].parent
    assert main(["predict", "--url", server.grpc_url, "--protocol", "grpc", "--json", "--top-k", "2", str(valid_dir)]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 30
    classes = RunDir(trained_run).read().classes
    for row in rows:
        assert set(row) == {"file", "label", "prob", "probs", "top_k"}
        assert list(row["probs"]) == classes and sum(row["probs"].values()) == pytest.approx(1.0, abs=1e-5)
        assert row["label"] == max(row["probs"], key=row["probs"].get) and row["prob"] == max(row["probs"].values())
        ranked = sorted(row["probs"].items(), key=lambda kv: -kv[1])[:2]
        assert [(t["label"], t["prob"]) for t in row["top_k"]] == ranked


def test_predict_finds_the_recorded_server_without_a_url(trained_run, server, server_state, capsys):
    file = _valid(trained_run).files[0]
    for protocol in ([], ["--protocol", "grpc"]):
        assert main(["predict", "--state-dir", str(server_state), *protocol, str(file)]) == 0
        out = capsys.readouterr().out
        assert out.startswith(str(file)) and out.split("\t")[1].split()[0] in RunDir(trained_run).read().classes
    client = Classifier(protocol="grpc", state_dir=server_state)
    assert (client.url, client.protocol) == (server.grpc_url, "grpc")
    assert Classifier(server.grpc_url, state_dir=server_state).protocol == "grpc"  # the recorded gRPC port
    assert main(["predict", "--state-dir", str(server_state.parent / "nothing"), str(file)]) == 2
    assert "no running server recorded" in capsys.readouterr().err


@pytest.mark.parametrize("protocol, port", [("http", "grpc"), ("grpc", "http")])
def test_protocol_mismatch_is_one_line(trained_run, server, capsys, protocol, port):
    url = server.grpc_url if port == "grpc" else server.http_url
    assert main(["predict", "--url", url, "--protocol", protocol, str(_valid(trained_run).files[0])]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"no Triton {protocol} endpoint at {url}" in err and f"the {port} port" in err, err


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_a_model_that_takes_no_encoded_images_is_one_line_before_any_request(trained_run, server, capsys, protocol, tmp_path):
    """predict sent every file to the backbone and failed each; bench sent thousands of requests."""
    url = server.http_url if protocol == "http" else server.grpc_url
    image = str(_valid(trained_run).files[0])
    for model, takes in (("backbone", "takes input"), ("preprocess", "takes IMAGE and names no classes")):
        for argv in (["predict", image], ["bench", "--images", image, "--seconds", "1", "--out", str(tmp_path)]):
            assert main([argv[0], "--url", url, "--protocol", protocol, "--model", model, *argv[1:]]) == 2
            err = capsys.readouterr().err.strip()
            assert err == (f"clfpipe: error: --model {model}: expected a clfpipe classifier that takes encoded images (IMAGE), "
                           f"such as classifier or classifier_tta; {model!r} on {url} {takes}"), err
    assert not list(tmp_path.iterdir())


def test_bench_refuses_a_bad_image_and_a_batch_over_the_models_before_any_request(trained_run, server, capsys, tmp_path):
    """A bad image among good ones failed its requests and the figures counted only the rest,
    with nothing said; --batch 100 failed every request."""
    folder = tmp_path / "images"
    folder.mkdir()
    for f in _valid(trained_run).files[:3]:
        shutil.copy(f, folder)
    (folder / "empty.jpg").write_bytes(b"")
    out = tmp_path / "bench"
    base = ["bench", "--url", server.http_url, "--seconds", "1", "--out", str(out)]
    assert main([*base, "--images", str(folder)]) == 2
    assert capsys.readouterr().err.strip() == (f"clfpipe: error: bench: {folder / 'empty.jpg'}: not an image: expected JPEG, "
                                               "PNG, BMP or WebP bytes, got an empty file: expected only images the server "
                                               "answers ('clfpipe data check' finds the others in a data folder)")
    (folder / "empty.jpg").unlink()
    assert main([*base, "--images", str(folder), "--batch", "100"]) == 2
    assert capsys.readouterr().err.strip() == "clfpipe: error: --batch: expected at most 32 (the max_batch_size of 'classifier'), got 100"
    assert not out.exists()


def test_a_folder_with_one_bad_file_gets_every_other_answer(trained_run, server, tmp_path, capsys):
    folder = tmp_path / "mixed"
    folder.mkdir()
    good = _valid(trained_run).files[:5]
    for f in good:
        shutil.copy(f, folder / f.name)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    assert main(["predict", "--url", server.http_url, str(folder)]) == 2
    captured = capsys.readouterr()
    answered = [line.split("\t")[0] for line in captured.out.splitlines()]
    assert sorted(answered) == sorted(str(folder / f.name) for f in good)
    (err,) = captured.err.strip().splitlines()
    assert "broken.jpg" in err and "not an image" in err


def test_non_image_gets_an_error_and_the_server_answers_the_next_request(trained_run, server, tmp_path, capsys):
    bad = tmp_path / "notes.jpg"
    bad.write_text("this is text, not a JPEG")
    good = _valid(trained_run).files[0]
    for protocol, url in (("http", server.http_url), ("grpc", server.grpc_url)):
        assert main(["predict", "--url", url, "--protocol", protocol, str(good), str(bad)]) == 2
        err = capsys.readouterr().err.strip()
        assert err == f"clfpipe: error: {bad}: refused: in ensemble 'classifier', not an image: expected encoded JPEG, " \
                      "PNG, BMP or WebP bytes, got 24 bytes starting b'this is '"
        assert main(["predict", "--url", url, "--protocol", protocol, str(good)]) == 0
        assert capsys.readouterr().out.startswith(str(good))
    with pytest.raises(ServeError, match="model 'nope' is not served"):
        Classifier(server.http_url, "http", model="nope")


def test_serve_up_status_down_stops_server_and_stubs(trained_run, server, tmp_path, capsys):
    state = tmp_path / "state"
    ports = Ports(free_port(), free_port(), free_port())
    argv_ports = ["--http-port", str(ports.http), "--grpc-port", str(ports.grpc), "--metrics-port", str(ports.metrics)]
    repo = str(trained_run / "model_repository")
    assert main(["serve", "up", "--repo", repo, "--state-dir", str(state), *argv_ports]) == 0
    info, status = server_status(state)
    assert status == "ready" and _group_alive(info.pid)
    assert main(["serve", "up", "--repo", repo, "--state-dir", str(state), *argv_ports]) == 2
    assert "already running" in capsys.readouterr().err
    assert main(["serve", "status", "--state-dir", str(state)]) == 0
    assert main(["serve", "down", "--state-dir", str(state)]) == 0
    assert not _group_alive(info.pid)  # tritonserver and its python stubs are gone
    assert main(["serve", "status", "--state-dir", str(state)]) == 3
    with pytest.raises(ServeError, match="port .* is in use"):
        start_server(trained_run / "model_repository", state, ports=Ports(server.ports.http, free_port(), free_port()))


def test_run_command_chains_train_export_repo(demo_data, tmp_path):
    run = tmp_path / "run"
    assert main(["run", "--data", str(demo_data), "--run", str(run), "--recipe", "recipes/demo.toml",
                 "--set", "stages.*.epochs=1", "--set", "stages.*.size=32", "--set", "lr_find.num_it=20"]) == 0
    manifest = RunDir(run).read()
    assert set(manifest.data["stages"]) == {"train", "export", "repo"}
    assert (run / "model_repository" / "backbone" / "1" / "model.onnx").is_file()
    shutil.rmtree(run)
