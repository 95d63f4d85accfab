"""Serving against the real tritonserver: TTA, labels, the pixel input form, batching, bad input."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import sysconfig
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from google.protobuf import text_format
from PIL import Image
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.utils import InferenceServerException

from clfpipe.cli import main
from clfpipe.contract.errors import ServeError
from clfpipe.contract.manifest import RunDir
from clfpipe.contract.preprocess import load_image, load_pixels
from clfpipe.contract.probabilities import softmax
from clfpipe.export.onnx_export import validation_split
from clfpipe.nn.reference import files_to_batch, load_run_model, torch_logits
from clfpipe.serve.bench import run_level, sweep
from clfpipe.serve.client import AsyncClassifier, Classifier
from clfpipe.serve.repository import build_repository
from clfpipe.serve.server import Ports, Process, find_triton, prepare_backends, remove_shm, server_args, server_env, stop_group
from clfpipe.train.evaluate import deterministic_tta

pytestmark = pytest.mark.slow


def _valid(run):
    return validation_split(RunDir(run), RunDir(run).read(), None)


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _infer(server, protocol: str, model: str, name: str, data: np.ndarray, datatype: str, **kwargs):
    lib, url = (httpclient, server.http_url) if protocol == "http" else (grpcclient, server.grpc_url)
    tensor = lib.InferInput(name, list(data.shape), datatype)
    tensor.set_data_from_numpy(data)
    # closed in the thread that made it: the HTTP client's gevent pool, closed by the garbage collector in
    # another thread, raised in its __del__ (PytestUnraisableExceptionWarning)
    with contextlib.closing(lib.InferenceServerClient(url)) as client:
        return client.infer(model, [tensor], outputs=[lib.InferRequestedOutput("PROBS"), lib.InferRequestedOutput("LABELS")],
                            **kwargs)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_classifier_tta_equals_the_training_side_deterministic_tta(trained_run, server, protocol):
    run = RunDir(trained_run)
    manifest = run.read()
    split = _valid(trained_run)
    expected = deterministic_tta(load_run_model(run, manifest), split, spec=manifest.preprocess, batch_size=32, device=torch.device("cpu"))
    client = Classifier(server.http_url if protocol == "http" else server.grpc_url, protocol, model="classifier_tta")
    served = client.probabilities([f.read_bytes() for f in split.files])
    np.testing.assert_allclose(served, expected, atol=1e-4)
    assert (served.argmax(1) == expected.argmax(1)).all()


def test_labels_follow_top_k_from_the_request_or_the_config(trained_run, server):
    data = np.array([[_valid(trained_run).files[0].read_bytes()]], dtype=np.object_)
    default = _infer(server, "http", "classifier", "IMAGE", data, "BYTES")
    probs, labels = default.as_numpy("PROBS")[0], default.as_numpy("LABELS")[0]
    classes = RunDir(trained_run).read().classes
    assert len(labels) == 3  # serve.top_k
    name, prob = labels[0].decode().split(":")
    assert name == classes[int(probs.argmax())] and float(prob) == pytest.approx(probs.max(), abs=1e-6)
    assert len(_infer(server, "grpc", "classifier", "IMAGE", data, "BYTES", parameters={"top_k": 1}).as_numpy("LABELS")[0]) == 1
    with pytest.raises(InferenceServerException, match="top_k: expected a positive integer") as refused:
        _infer(server, "http", "classifier", "IMAGE", data, "BYTES", parameters={"top_k": "many"})
    assert refused.value.status() == INVALID_INPUT["http"]


def test_predict_csv_writes_a_row_per_image_with_every_class(trained_run, server, tmp_path, capsys):
    import csv

    folder = _valid(trained_run).files[0].parent
    out = tmp_path / "sub" / "submission.csv"
    assert main(["predict", "--url", server.grpc_url, "--protocol", "grpc", "--model", "classifier_tta", "--csv", str(out),
                 str(folder)]) == 0
    classes = RunDir(trained_run).read().classes
    assert capsys.readouterr().out == f"wrote {out}: 30 images, {len(classes)} classes\n"
    rows = list(csv.reader(out.open()))
    assert rows[0] == ["file", "label", *classes] and len(rows) == 31
    expected = Classifier(server.http_url, "http", model="classifier_tta").predict([folder])
    for row, want in zip(rows[1:], expected):
        probs = np.array(row[2:], float)
        assert row[0] == want.file and row[1] == want.label == classes[int(probs.argmax())]
        np.testing.assert_allclose(probs, want.probs, rtol=1e-5)


def test_decoded_pixels_give_the_same_answer_without_re_encoding(trained_run, server):
    files = _valid(trained_run).files[:4]
    client = Classifier(server.http_url, "http")
    from_bytes = client.probabilities([f.read_bytes() for f in files])
    arrays = [np.asarray(load_image(f)) for f in files]
    from_pixels = np.stack([p.probs for p in client.predict(arrays)])
    np.testing.assert_allclose(from_pixels, from_bytes, atol=1e-6)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_async_client_answers_as_the_sync_one_and_names_a_refused_file(trained_run, server, protocol, tmp_path):
    url = server.http_url if protocol == "http" else server.grpc_url
    folder = _valid(trained_run).files[0].parent
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"notimage")

    async def go():
        async with AsyncClassifier(url, protocol) as client:
            predictions = await client.predict([folder], top_k=2)
            with pytest.raises(ServeError) as refused:
                await client.predict([folder, bad])  # 31 images in one request: the last is refused
            return predictions, str(refused.value)

    predictions, refused = asyncio.run(go())
    assert len(predictions) == 30 and all(len(p.top_k) == 2 for p in predictions)
    sync = Classifier(url, protocol).predict([folder])
    assert [p.file for p in predictions] == [p.file for p in sync] and [p.label for p in predictions] == [p.label for p in sync]
    np.testing.assert_allclose([p.probs for p in predictions], [p.probs for p in sync], atol=1e-6)
    assert refused.startswith(f"{bad}: refused: ") and "not an image" in refused, refused


def test_batches_form_under_concurrency(trained_run, server):
    images = [f.read_bytes() for f in _valid(trained_run).files]
    for model, backbone in (("classifier", "backbone"), ("classifier_tta", "backbone_tta")):
        level = run_level(server.http_url, "http", model, images, concurrency=8, requests=64)
        stats = level.server[backbone]
        assert level.errors == 0 and stats["inference_count"] == 64
        assert stats["execution_count"] < stats["inference_count"] / 1.5, stats  # dynamic batches formed
        # each backbone_tta execution runs len(views) x its batch through the network, inside the graph


def test_bench_command_writes_csv_json_png(trained_run, server, tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["bench", "--url", server.grpc_url, "--protocol", "grpc", "--concurrency", "1,4", "--requests", "8",
                 "--images", str(_valid(trained_run).files[0].parent), "--max-images", "6", "--out", str(out)]) == 0
    assert "bench: sending 6 of the 30 images, spread evenly over them" in capsys.readouterr().err
    report = json.loads((out / "bench.json").read_text())
    assert [l["concurrency"] for l in report["levels"]] == [1, 4]
    for level in report["levels"]:
        assert level["requests"] == level["images"] == 8 and level["errors"] == 0
        assert level["throughput"] == pytest.approx(level["images"] / level["seconds"])
        assert 0 < level["p50_ms"] <= level["p90_ms"] <= level["p95_ms"] <= level["p99_ms"] < level["seconds"] * 1000
        backbone = level["server"]["backbone"]
        assert backbone["inference_count"] == 8 and 1 <= backbone["mean_batch"] <= level["concurrency"]
        assert backbone["queue_us"] >= 0 and backbone["compute_infer_us"] > 0
    assert (out / "bench.csv").read_text().count("\n") == 3 and (out / "bench.png").stat().st_size > 1000


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_bench_says_why_every_request_failed_and_bounds_its_clients(trained_run, server, protocol):
    images = [f.read_bytes() for f in _valid(trained_run).files[:2]]
    url = server.http_url if protocol == "http" else server.grpc_url
    with pytest.raises(ServeError, match=r"every request to 'classifier' failed at concurrency 1 \(2 errors; the first: "
                                         r".*not an image.*\)$"):
        sweep(url, "classifier", [b"plain text"], protocol=protocol, concurrencies=[1], requests=2)  # bytes: unchecked
    with pytest.raises(ServeError, match=r"^--batch: expected at most 32 \(the max_batch_size of 'classifier'\), got 1000$"):
        sweep(url, "classifier", images, protocol=protocol, concurrencies=[1], batch=1000, requests=2)
    with pytest.raises(ServeError, match=r"--concurrency: expected 1 to 1024 clients a level, got 99999"):
        sweep(url, "classifier", images, protocol=protocol, concurrencies=[1, 99999], requests=2)


# A request the models refuse is the client's fault, as Triton's own checks of shape and dtype say:
# not 500 / INTERNAL, which load balancers and retrying clients take for a failing server.
INVALID_INPUT = {"http": "400", "grpc": "StatusCode.INVALID_ARGUMENT"}

BAD_INPUTS = {
    "not an image": (b"GIF? no, plain text", "not an image"),
    "truncated JPEG": (None, "not a decodable image"),
    "empty bytes": (b"", "empty image"),
    "decompression bomb": (_png(np.zeros((8200, 8000), np.uint8)), "image too large"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_bad_input_gets_a_clear_error_and_the_next_request_its_answer(trained_run, server, case, protocol):
    good = _valid(trained_run).files[0].read_bytes()
    payload, message = BAD_INPUTS[case]
    payload = good[: len(good) // 3] if payload is None else payload
    with pytest.raises(InferenceServerException, match=message) as refused:
        _infer(server, protocol, "classifier", "IMAGE", np.array([[payload]], dtype=np.object_), "BYTES")
    assert refused.value.status() == INVALID_INPUT[protocol]
    probs = _infer(server, protocol, "classifier", "IMAGE", np.array([[good]], dtype=np.object_), "BYTES").as_numpy("PROBS")
    assert probs.shape == (1, 3) and probs.sum() == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("image", [np.random.default_rng(0).integers(0, 256, (40, 50), dtype=np.uint8),
                                   np.random.default_rng(1).integers(0, 256, (40, 50, 4), dtype=np.uint8),
                                   np.random.default_rng(2).integers(0, 65536, (40, 50), dtype=np.uint16)],
                         ids=["gray", "rgba", "16-bit"])
def test_other_png_modes_are_served_as_pytorch_sees_them(trained_run, server, image, tmp_path):
    probs = _infer(server, "http", "classifier", "IMAGE", np.array([[_png(image)]], dtype=np.object_), "BYTES").as_numpy("PROBS")
    path = tmp_path / "x.png"
    path.write_bytes(_png(image))
    run = RunDir(trained_run)
    manifest = run.read()
    expected = softmax(torch_logits(load_run_model(run, manifest), files_to_batch([path], manifest.preprocess)))
    np.testing.assert_allclose(probs, expected, atol=1e-5)


def test_wrong_dtype_shape_and_empty_batch_are_refused(server):
    with pytest.raises(InferenceServerException):
        _infer(server, "http", "classifier", "IMAGE", np.zeros((1, 1), np.float32), "FP32")
    with pytest.raises(InferenceServerException):
        _infer(server, "grpc", "classifier", "IMAGE", np.array([[b"a", b"b"]], dtype=np.object_), "BYTES")  # dims [1]
    with pytest.raises(InferenceServerException):
        _infer(server, "http", "classifier_pixels", "IMAGE_PIXELS", np.zeros((1, 8, 8, 4), np.uint8), "UINT8")
    with pytest.raises(InferenceServerException):
        _infer(server, "http", "classifier", "IMAGE", np.zeros((0, 1), np.object_), "BYTES")


def test_one_bad_request_in_a_dynamic_batch_fails_alone(trained_run, server):
    good = [f.read_bytes() for f in _valid(trained_run).files[:12]]
    results: dict[int, object] = {}

    def send(i: int, payload: bytes) -> None:
        try:
            results[i] = _infer(server, "http", "classifier", "IMAGE", np.array([[payload]], dtype=np.object_), "BYTES").as_numpy("PROBS")
        except InferenceServerException as exc:
            results[i] = exc

    payloads = [b"junk" if i % 4 == 0 else g for i, g in enumerate(good)]
    threads = [threading.Thread(target=send, args=(i, p)) for i, p in enumerate(payloads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(len(payloads)):
        assert isinstance(results[i], InferenceServerException) == (i % 4 == 0), (i, results[i])
    assert Classifier(server.http_url, "http").probabilities(good[:1]).shape == (1, 3)


def test_both_targets_generate_configs_triton_parses(trained_run, tmp_path):
    for target in ("embedded", "container"):
        repo = build_repository(trained_run, tmp_path / target, target)
        configs = list(repo.glob("*/config.pbtxt"))
        assert len(configs) >= 7
        for path in configs:
            config = text_format.Parse(path.read_text(), mc.ModelConfig())
            assert config.name == path.parent.name
            for warmup in config.model_warmup:
                for spec in warmup.inputs.values():
                    if spec.input_data_file:
                        data = (path.parent / "warmup" / spec.input_data_file).read_bytes()
                        assert struct.unpack("<I", data[:4])[0] == len(data) - 4  # one length-prefixed BYTES element
    container = tmp_path / "container"
    assert (container / "preprocess" / "1" / "clfpipe_preprocess.py").is_file()
    assert (container / "labels" / "1" / "clfpipe_probabilities.py").is_file()
    backbone = text_format.Parse((container / "backbone" / "config.pbtxt").read_text(), mc.ModelConfig())
    assert backbone.platform == "onnxruntime_onnx"
    import onnx

    assert [o.name for o in onnx.load(str(container / "backbone" / "1" / "model.onnx")).graph.output] == ["PROBS"]


def _without_clfpipe(venv: Path) -> Path:
    """A venv's bin folder whose python sees this one's packages but not clfpipe, as NVIDIA's image
    has numpy and Pillow but no clfpipe: this site-packages is a plain path there, so its .pth files
    (the editable install's finder among them) are not read."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = Path(sysconfig.get_paths()["purelib"])
    (Path(sysconfig.get_paths(vars={"base": str(venv), "platbase": str(venv)})["purelib"]) / "packages.pth").write_text(f"{site}\n")
    check = subprocess.run([str(venv / "bin" / "python"), "-c", "import numpy, PIL; import clfpipe"], capture_output=True,
                           text=True, cwd=venv)
    assert "No module named 'clfpipe'" in check.stderr, check.stderr
    return venv / "bin"


def test_the_container_s_python_steps_serve_without_clfpipe_as_nvidia_s_image_runs_them(trained_run, tmp_path):
    """The container repository's preprocess and labels models, on the real tritonserver, in a
    Python where ``import clfpipe`` fails: they run on the modules shipped beside them, and answer
    as the project's own code. Without its shipped module a model does not load (the control)."""
    container = build_repository(trained_run, tmp_path / "container", "container")
    repo = tmp_path / "steps"
    for name in ("preprocess", "labels"):
        shutil.copytree(container / name, repo / name)
    control = repo / "labels_unshipped"
    shutil.copytree(container / "labels", control)
    (control / "1" / "clfpipe_probabilities.py").unlink()
    config = text_format.Parse((control / "config.pbtxt").read_text(), mc.ModelConfig())
    config.name = control.name
    (control / "config.pbtxt").write_text(text_format.MessageToString(config))
    env = server_env(install := find_triton())
    env["PATH"] = f"{_without_clfpipe(tmp_path / 'venv')}{os.pathsep}{env['PATH']}"  # the python the stub embeds
    ports = Ports.free()
    args = server_args(install, repo, prepare_backends(install, tmp_path / "state"), host="127.0.0.1", ports=ports)
    with open(tmp_path / "triton.log", "wb") as log:
        proc = subprocess.Popen([*args, "--exit-on-error=false"], stdout=log, stderr=subprocess.STDOUT, env=env,
                                cwd=tmp_path, start_new_session=True)
    process = Process.of(proc.pid)
    try:
        with contextlib.closing(httpclient.InferenceServerClient(f"127.0.0.1:{ports.http}")) as client:
            _wait_for_models(client, proc, ("preprocess", "labels"), tmp_path / "triton.log")
            assert not client.is_model_ready("labels_unshipped")
            _labels_answer_as_the_project_s_code(client, RunDir(trained_run).read())
            _preprocess_answers_as_the_project_s_code(client, RunDir(trained_run).read(), _valid(trained_run).files[:4])
        assert "No module named 'clfpipe_probabilities'" in (tmp_path / "triton.log").read_text()
    finally:
        if process is not None:
            stop_group(process)
        remove_shm(ports)


def _wait_for_models(client, proc, models, log, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not all(_ready(client, m) for m in models):
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
        time.sleep(0.5)


def _ready(client, model: str) -> bool:
    try:
        return client.is_model_ready(model)
    except Exception:  # not listening yet
        return False


def _labels_answer_as_the_project_s_code(client, manifest) -> None:
    probs = np.random.default_rng(0).dirichlet(np.ones(len(manifest.classes)), size=5).astype(np.float32)
    tensor = httpclient.InferInput("PROBS", list(probs.shape), "FP32")
    tensor.set_data_from_numpy(probs)
    for top_k in (1, 2):
        labels = client.infer("labels", [tensor], parameters={"top_k": top_k}).as_numpy("LABELS")
        for row, served in zip(probs, labels):
            best = np.argsort(-row, kind="stable")[:top_k]
            assert [s.decode().split(":")[0] for s in served] == [manifest.classes[i] for i in best]
            assert [float(s.decode().split(":")[1]) for s in served] == pytest.approx(row[best], abs=1e-4)
    with pytest.raises(InferenceServerException, match="top_k: expected a positive integer, got 0") as refused:
        client.infer("labels", [tensor], parameters={"top_k": 0})
    assert refused.value.status() == INVALID_INPUT["http"]


def _preprocess_answers_as_the_project_s_code(client, manifest, files) -> None:
    for path in files:
        tensor = httpclient.InferInput("IMAGE", [1, 1], "BYTES")
        tensor.set_data_from_numpy(np.array([[path.read_bytes()]], dtype=np.object_))
        served = client.infer("preprocess", [tensor]).as_numpy("PIXELS")
        np.testing.assert_array_equal(served, load_pixels([path], manifest.preprocess))
    tensor.set_data_from_numpy(np.array([[b"notimage"]], dtype=np.object_))
    with pytest.raises(InferenceServerException, match="not an image") as refused:
        client.infer("preprocess", [tensor])
    assert refused.value.status() == INVALID_INPUT["http"]


def _non_loopback_address() -> str | None:
    """This host's address on its default route (a UDP connect sends nothing), if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(("192.0.2.1", 9))
        except OSError:
            return None
        address = sock.getsockname()[0]
    return None if address.startswith("127.") else address


def test_server_binds_loopback_by_default(server):
    address = _non_loopback_address()
    if address is None:
        pytest.skip("this host has no non-loopback IPv4 address to try")
    with socket.socket() as control:  # the address is reachable: a listener on all interfaces accepts there
        control.bind(("0.0.0.0", 0))
        control.listen()
        socket.create_connection((address, control.getsockname()[1]), timeout=5).close()
    assert server.host == "127.0.0.1"
    for port in (server.ports.http, server.ports.grpc, server.ports.metrics):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((address, port), timeout=5)
