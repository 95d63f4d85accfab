"""Engines side by side on the same model and images: interleaved rounds, medians.

    python benchmarks/engines.py [--run RUN_DIR] [--size 224] [--batch 32] [--rounds 7]

CPU: ONNX Runtime fp32 against PyTorch eager (ort_vs_torch_b32, goal >= 1.5) and ONNX Runtime int8
(QDQ, uint8 activations) against fp32 (int8_vs_fp32_b32, goal >= 2) with the int8 graph's top-1
agreement and, for a trained run, its accuracy against fp32's. Beside the times, the rate each
engine reaches (the model's GFLOP by torch's FLOP counter over the batch's time) and a yardstick,
ONNX Runtime's rate on one 4096 x 4096 fp32 matrix product on this host (ort_matmul_gflop_s): an
engine near it has little left to gain at fp32 but fewer or cheaper operations. CUDA, where
there is one: torch.compile (max-autotune) against eager fp16 channels_last at batch 256
(compiled_vs_eager_b256, goal >= 1.3). With no --run, resnet34 at its seeded initial weights on
generated images: the speed figures are the model's, the agreement figures only say the int8
graph tracks fp32.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper
from torch.utils.flop_counter import FlopCounterMode

from clfpipe.contract.dataset import scan_split
from clfpipe.contract.engines import Variant
from clfpipe.contract.manifest import RunDir
from clfpipe.contract.preprocess import load_pixels
from clfpipe.contract.recipe import load_recipe
from clfpipe.demo_data import DemoSpec, write_demo_dataset
from clfpipe.export.onnx_export import calibration_files, export_onnx
from clfpipe.export.quantize import quantize_int8
from clfpipe.nn.reference import load_run_model
from clfpipe.runtime.ort import make_session, run_graph
from clfpipe.train.loop import init_run


def interleaved(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median seconds of each, one call of each per round (timings on a shared machine drift)."""
    for fn in fns.values():
        fn()  # warm up
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def build_run(root: Path, size: int) -> Path:
    data = root / "data"
    write_demo_dataset(data, spec=DemoSpec(train_per_class=32, valid_per_class=32, image_size=size + size // 4))
    run = init_run(data, root / "run", load_recipe(None, [f"stages.0.size={size}"]))
    export_onnx(run, variant=Variant())
    return run


def _int8_session(fp32_path: Path, calibration: np.ndarray) -> ort.InferenceSession:
    """An ONNX Runtime session over the int8 quantisation of ``fp32_path`` (the session holds the
    model, so its file goes with the temporary folder)."""
    with tempfile.TemporaryDirectory() as tmp:
        int8_path = Path(tmp) / "int8.onnx"
        quantize_int8(fp32_path, int8_path, calibration, symmetric_activations=False)
        return make_session(int8_path)


def model_gflop(model: torch.nn.Module, x: torch.Tensor) -> float:
    """GFLOP of one call of ``model`` on ``x`` (a multiply-add counts 2), by torch's FLOP counter."""
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(x)
    return counter.get_total_flops() / 1e9


def ort_matmul_gflop_s(n: int = 4096, rounds: int = 5) -> float:
    """ONNX Runtime's fp32 rate on one n x n matrix product on this host, median of ``rounds``, in a
    session made as the engines' are (``make_session``)."""
    square = [n, n]
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "matmul",
                              [helper.make_tensor_value_info(name, TensorProto.FLOAT, square) for name in "ab"],
                              [helper.make_tensor_value_info("c", TensorProto.FLOAT, square)])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "matmul.onnx"
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
        session = make_session(path)
    a, b = (np.random.default_rng(seed).standard_normal(square, dtype=np.float32) for seed in (0, 1))
    seconds = interleaved({"matmul": lambda: session.run(None, {"a": a, "b": b})}, rounds)["matmul"]
    return 2 * n**3 / seconds / 1e9


def cpu_figures(run_dir: Path, batch: int, rounds: int, trained: bool) -> dict:
    run = RunDir(run_dir)
    manifest = run.read()
    spec = manifest.preprocess
    valid = scan_split(run.data_dir(manifest), "valid", tuple(manifest.classes))
    files = list(valid.files)[: max(batch, 1)]
    while len(files) < batch:
        files = files + files
    x = Variant().input_form.prepare(load_pixels(files[:batch], spec), spec)
    model = load_run_model(run, manifest)
    fp32_path = run.artifact_path(manifest, "onnx")
    train = scan_split(run.data_dir(manifest), "train", tuple(manifest.classes), verify=False)
    calibration = load_pixels(calibration_files(train, 64, manifest.recipe.seed), spec)
    fp32, int8 = make_session(fp32_path), _int8_session(fp32_path, Variant().input_form.prepare(calibration, spec))
    tensor = torch.from_numpy(x)
    with torch.inference_mode():
        medians = interleaved({"torch": lambda: model(tensor), "ort_fp32": lambda: run_graph(fp32, x, batch),
                               "ort_int8": lambda: run_graph(int8, x, batch)}, rounds)
    gflop, roof = model_gflop(model, tensor), ort_matmul_gflop_s()
    all_x = Variant().input_form.prepare(load_pixels(valid.files, spec), spec)
    ref, q = run_graph(fp32, all_x), run_graph(int8, all_x)
    labels = np.asarray(valid.labels)
    out = {"torch_b32_s": round(medians["torch"], 4), "ort_fp32_b32_s": round(medians["ort_fp32"], 4),
           "ort_int8_b32_s": round(medians["ort_int8"], 4),
           "ort_vs_torch_b32": round(medians["torch"] / medians["ort_fp32"], 2),
           "int8_vs_fp32_b32": round(medians["ort_fp32"] / medians["ort_int8"], 2),
           "int8_top1_agreement": round(float((ref.argmax(1) == q.argmax(1)).mean()), 4), "images": len(labels),
           "gflop_per_batch": round(gflop, 1), "torch_gflop_s": round(gflop / medians["torch"], 1),
           "ort_fp32_gflop_s": round(gflop / medians["ort_fp32"], 1), "ort_matmul_gflop_s": round(roof, 1)}
    if trained:
        out["int8_accuracy_drop"] = round(float((ref.argmax(1) == labels).mean() - (q.argmax(1) == labels).mean()), 4)
    return out


def cuda_figures(size: int, rounds: int) -> dict:
    """torch.compile (max-autotune) vs eager, fp16 channels_last, batch 256."""
    import torchvision

    model = torchvision.models.resnet34().cuda().half().eval().to(memory_format=torch.channels_last)
    x = torch.randn(256, 3, size, size, device="cuda").half().to(memory_format=torch.channels_last)
    start = time.perf_counter()
    compiled = torch.compile(model, mode="max-autotune")
    with torch.inference_mode():
        compiled(x)
        torch.cuda.synchronize()
        compile_s = time.perf_counter() - start

        def timed(fn):
            return lambda: (fn(x), torch.cuda.synchronize())

        medians = interleaved({"eager": timed(model), "compiled": timed(compiled)}, rounds)
    return {"gpu": torch.cuda.get_device_name(), "compile_s": round(compile_s, 1),
            "eager_fp16_b256_img_s": round(256 / medians["eager"], 1), "compiled_fp16_b256_img_s": round(256 / medians["compiled"], 1),
            "compiled_vs_eager_b256": round(medians["eager"] / medians["compiled"], 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, help="a trained run with its fp32 ONNX exported (accuracy then means something)")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    result: dict = {"machine": f"{platform.machine()} {os.cpu_count()} cores", "batch": args.batch}
    with tempfile.TemporaryDirectory() as tmp:
        run = args.run or build_run(Path(tmp), args.size)
        manifest = RunDir(run).read()
        result.update(arch=manifest.recipe.model.arch, size=manifest.preprocess.crop, trained=args.run is not None)
        result["cpu"] = cpu_figures(run, args.batch, args.rounds, trained=args.run is not None)
    if torch.cuda.is_available():
        result["cuda"] = cuda_figures(args.size, args.rounds)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
