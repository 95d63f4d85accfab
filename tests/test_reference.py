"""The gates' and verify's runners turn uint8 pixels into a graph's float32 input a chunk at a time: the
whole validation set's float32 copy (600 KB an image at 224) made a big folder's export run out of memory."""

from __future__ import annotations

import tracemalloc

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper
from PIL import Image

from clfpipe.contract.engines import FLOAT_NCHW, in_chunks
from clfpipe.contract.preprocess import PreprocessSpec, load_pixels, normalize
from clfpipe.nn.reference import torch_logits
from clfpipe.runtime.ort import make_session, run_graph
from clfpipe.runtime.torch_engine import save_prepared

SPEC = PreprocessSpec(resize=32, crop=32)
N, BATCH = 256, 32


def _pixels() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (N, 32, 32, 3), dtype=np.uint8)


def _peak_bytes(fn) -> int:
    """numpy's allocations (tracemalloc sees them) at their peak while fn runs; torch's are not counted."""
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_torch_logits_prepares_each_chunk_as_the_whole_batch_would_be():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 5)).eval()
    pixels, seen = _pixels(), []

    def prepare(chunk: np.ndarray) -> np.ndarray:
        seen.append(len(chunk))
        return normalize(chunk, SPEC)

    whole = torch_logits(model, normalize(pixels, SPEC), batch_size=BATCH)
    np.testing.assert_array_equal(torch_logits(model, pixels, batch_size=BATCH, prepare=prepare), whole)
    assert seen == [BATCH] * (N // BATCH)
    float_copy = normalize(pixels, SPEC).nbytes
    assert _peak_bytes(lambda: torch_logits(model, pixels, batch_size=BATCH, prepare=prepare)) < float_copy / 2


def test_run_graph_prepares_each_chunk(tmp_path):
    node = helper.make_node("ReduceMean", ["input"], ["logits"], axes=[2, 3], keepdims=0)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 3, 32, 32])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 3])])
    path = tmp_path / "mean.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    session, pixels = make_session(path), _pixels()
    prepare = lambda chunk: normalize(chunk, SPEC)  # noqa: E731
    whole = run_graph(session, normalize(pixels, SPEC), batch_size=BATCH)
    np.testing.assert_allclose(run_graph(session, pixels, batch_size=BATCH, prepare=prepare), whole, rtol=1e-6)
    np.testing.assert_allclose(whole, normalize(pixels, SPEC).mean(axis=(2, 3)), rtol=1e-4, atol=1e-5)
    assert _peak_bytes(lambda: run_graph(session, pixels, batch_size=BATCH, prepare=prepare)) < normalize(pixels, SPEC).nbytes / 2


def test_in_chunks_prepares_and_runs_each_chunk_once():
    pixels, seen = _pixels()[:7], []

    def run(x: np.ndarray) -> np.ndarray:
        seen.append(x.dtype)
        return x.reshape(len(x), -1).sum(axis=1, keepdims=True)

    out = in_chunks(run, pixels, size=3, prepare=lambda chunk: chunk.astype(np.float64))
    assert seen == [np.float64] * 3  # 3 + 3 + 1 images
    np.testing.assert_array_equal(out, pixels.reshape(7, -1).sum(axis=1, keepdims=True))


def test_the_child_processs_input_is_written_a_chunk_at_a_time(tmp_path):
    """run_in_child hands the torch engines' child its whole input as a file: it was np.save of
    the whole prepared set, which a float variant's verify made in memory first."""
    pixels = np.concatenate([_pixels()] * 4)  # 16 chunks: one chunk's float32 input and temporaries are ~2.4 MB
    prepare = FLOAT_NCHW.preparer(SPEC)
    save_prepared(tmp_path / "in.npy", pixels, prepare)
    np.testing.assert_array_equal(np.load(tmp_path / "in.npy"), normalize(pixels, SPEC))
    peak = _peak_bytes(lambda: save_prepared(tmp_path / "again.npy", pixels, prepare))
    assert peak < normalize(pixels, SPEC).nbytes / 2


def test_load_pixels_holds_each_image_once(tmp_path):
    """It stacked a list of the decoded images at the end: every image twice at the peak."""
    files = []
    for i, image in enumerate(_pixels()):
        files.append(tmp_path / f"{i}.png")
        Image.fromarray(image).save(files[-1])
    pixels = load_pixels(files, SPEC)
    np.testing.assert_array_equal(pixels, _pixels())  # 32 px: resize and crop leave them as they are
    assert _peak_bytes(lambda: load_pixels(files, SPEC)) < 1.25 * pixels.nbytes


MIN_BATCH = 30  # an engine built with --min-batch 30 --max-batch 32


class ReusingRunner:
    """As Polygraphy's TrtRunner: every call's output is a view of one host buffer it reuses."""

    def __init__(self, engine: object) -> None:
        self.buffer = np.empty((BATCH, 3), np.float32)

    def __enter__(self) -> "ReusingRunner":
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        assert MIN_BATCH <= len(feed["input"]) <= BATCH, "outside the engine's profile"
        out = self.buffer[: len(feed["input"])]
        out[:] = feed["input"].mean(axis=(2, 3))
        return {"logits": out}


def test_tensorrt_outputs_are_kept_past_the_runners_next_call(monkeypatch):
    """Every chunk's logits were a view of TrtRunner's one host buffer: verify compared the last
    chunk's outputs, repeated, against PyTorch (TensorRT is absent here: the runner's reuse is faked)."""
    import polygraphy.backend.trt

    from clfpipe.runtime.tensorrt import run_engine

    monkeypatch.setattr(polygraphy.backend.trt, "TrtRunner", ReusingRunner)
    pixels = _pixels()[:-3]  # the last chunk, 29 images, is below the profile's least: padded
    out = run_engine(object(), pixels, BATCH, prepare=FLOAT_NCHW.preparer(SPEC), min_batch=MIN_BATCH)
    np.testing.assert_allclose(out, normalize(pixels, SPEC).mean(axis=(2, 3)), rtol=1e-5, atol=1e-6)
