"""Serving against the real tritonserver: TTA, labels, the pixel input form, batching, bad input."""

from __future__ import annotations

import asyncio
import io
import json
import struct
import threading

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
from clfpipe.inference import load_run_model
from clfpipe.manifest import RunDir
from clfpipe.preprocess import load_image
from export.onnx_export import validation_split
from serve.bench import run_level
from serve.client import AsyncClassifier, Classifier
from serve.repository import build_repository
from train.evaluate import deterministic_tta

pytestmark = pytest.mark.slow


def _valid(run):
    return validation_split(RunDir(run).read(), None)


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _infer(server, protocol: str, model: str, name: str, data: np.ndarray, datatype: str, **kwargs):
    lib, url = (httpclient, server.http_url) if protocol == "http" else (grpcclient, server.grpc_url)
    client = lib.InferenceServerClient(url)
    tensor = lib.InferInput(name, list(data.shape), datatype)
    tensor.set_data_from_numpy(data)
    return client.infer(model, [tensor], outputs=[lib.InferRequestedOutput("PROBS"), lib.InferRequestedOutput("LABELS")], **kwargs)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_classifier_tta_equals_the_training_side_deterministic_tta(trained_run, server, protocol):
    run = RunDir(trained_run)
    manifest = run.read()
    split = _valid(trained_run)
    expected = deterministic_tta(load_run_model(run, manifest), split, manifest.preprocess, 32, torch.device("cpu"))
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
    with pytest.raises(InferenceServerException, match="top_k: expected a positive integer"):
        _infer(server, "http", "classifier", "IMAGE", data, "BYTES", parameters={"top_k": "many"})


def test_decoded_pixels_give_the_same_answer_without_re_encoding(trained_run, server):
    files = _valid(trained_run).files[:4]
    client = Classifier(server.http_url, "http")
    from_bytes = client.probabilities([f.read_bytes() for f in files])
    arrays = [np.asarray(load_image(f)) for f in files]
    from_pixels = np.stack([p.probs for p in client.predict(arrays)])
    np.testing.assert_allclose(from_pixels, from_bytes, atol=1e-6)


def test_async_client(trained_run, server):
    async def go():
        client = AsyncClassifier(server.grpc_url, "grpc")
        try:
            return await client.predict([_valid(trained_run).files[0].parent], top_k=2)
        finally:
            await client.close()

    predictions = asyncio.run(go())
    assert len(predictions) == 30 and all(len(p.top_k) == 2 for p in predictions)
    sync = Classifier(server.http_url, "http").predict([_valid(trained_run).files[0].parent])
    assert [p.label for p in predictions] == [p.label for p in sync]


def test_batches_form_under_concurrency(trained_run, server):
    images = [f.read_bytes() for f in _valid(trained_run).files]
    for model, backbone in (("classifier", "backbone"), ("classifier_tta", "backbone_tta")):
        level = run_level(server.http_url, "http", model, images, 8, 1, 64, None)
        stats = level.server[backbone]
        assert level.errors == 0 and stats["inference_count"] == 64
        assert stats["execution_count"] < stats["inference_count"] / 1.5, stats  # dynamic batches formed
        # each backbone_tta execution runs len(views) x its batch through the network, inside the graph


def test_bench_command_writes_csv_json_png(trained_run, server, tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["bench", "--url", server.grpc_url, "--protocol", "grpc", "--concurrency", "1,4", "--requests", "8",
                 "--images", str(_valid(trained_run).files[0].parent), "--out", str(out)]) == 0
    report = json.loads((out / "bench.json").read_text())
    assert [l["concurrency"] for l in report["levels"]] == [1, 4]
    level = report["levels"][1]
    assert level["throughput"] > 0 and level["p50_ms"] <= level["p99_ms"]
    assert {"preprocess", "backbone"} <= set(level["server"]) and "queue_us" in level["server"]["backbone"]
    assert (out / "bench.csv").read_text().count("\n") == 3 and (out / "bench.png").stat().st_size > 1000


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
    with pytest.raises(InferenceServerException, match=message):
        _infer(server, protocol, "classifier", "IMAGE", np.array([[payload]], dtype=np.object_), "BYTES")
    probs = _infer(server, protocol, "classifier", "IMAGE", np.array([[good]], dtype=np.object_), "BYTES").as_numpy("PROBS")
    assert probs.shape == (1, 3) and probs.sum() == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("image", [np.full((40, 50), 90, np.uint8), np.full((40, 50, 4), 200, np.uint8),
                                   np.full((40, 50), 40000, np.uint16)], ids=["gray", "rgba", "16-bit"])
def test_other_png_modes_are_served(server, image):
    probs = _infer(server, "http", "classifier", "IMAGE", np.array([[_png(image)]], dtype=np.object_), "BYTES").as_numpy("PROBS")
    assert probs.shape == (1, 3)


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
        repo = build_repository(trained_run, tmp_path / target, target, log=lambda _: None)
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
    assert (container / "labels" / "1" / "clfpipe_postprocess.py").is_file()
    backbone = text_format.Parse((container / "backbone" / "config.pbtxt").read_text(), mc.ModelConfig())
    assert backbone.platform == "onnxruntime_onnx"
    import onnx

    assert [o.name for o in onnx.load(str(container / "backbone" / "1" / "model.onnx")).graph.output] == ["PROBS"]


def test_server_binds_loopback_by_default(server):
    assert server.host == "127.0.0.1"
