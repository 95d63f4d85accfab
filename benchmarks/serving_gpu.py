"""GPU serving benchmark: JPEG bytes -> probabilities through the embedded Triton's fused step
(nvJPEG decode + the torch engine on the GPU) against the same decoder and engine in process.

    python benchmarks/serving_gpu.py [--arch resnet34] [--size 224] [--precision fp16] [--seconds 6] [--instances 2]

It builds a run at the model's initial weights (the serving cost does not depend on them), exports
the folded graph as an exported program at --precision, serves it with decode=nvjpeg over gRPC,
and measures on the same 500x375 photo-like JPEGs, interleaved (served, in process, served, ...):

- served: concurrency 64 x 16 images per request (img/s), and concurrency 1 x 1 image (p50 ms);
- in process: ``DevicePreprocessor.decode`` + ``TorchProbabilities.on_device`` at batch 256
  (img/s), and one image at a time (p50 ms).

Prints one JSON line; served_vs_in_process (goal >= 0.9), served img/s (goal >= 8,000 on an H100)
and served p50 at concurrency 1 (goal <= 10 ms). The goals are a GPU's; without CUDA it runs on
the CPU (fp32 only, torchvision's CPU decoder) as a smoke test of the same code.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from clfpipe.contract.manifest import RunDir
from clfpipe.contract.recipe import load_recipe
from clfpipe.demo_data import DemoSpec, write_demo_dataset
from clfpipe.export.pt2_export import export_pt2
from clfpipe.runtime.nvjpeg import DevicePreprocessor
from clfpipe.runtime.torch_engine import TorchProbabilities, device_here
from clfpipe.serve.bench import run_level
from clfpipe.serve.repository import build_repository
from clfpipe.serve.server import Ports, start_server, stop_server
from clfpipe.train.loop import init_run


def photo_like_jpegs(count: int, size: tuple[int, int] = (500, 375), seed: int = 0) -> list[bytes]:
    """Smooth colour fields with edges and noise: JPEGs of about a photo's size in bytes."""
    rng = np.random.default_rng(seed)
    width, height = size
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    out = []
    for _ in range(count):
        base = np.stack([np.sin(xx / rng.uniform(20, 80) + rng.uniform(0, 6)) * np.cos(yy / rng.uniform(20, 80))
                         for _ in range(3)], -1)
        img = np.clip(127 + 90 * base + rng.normal(0, 18, base.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def build_run(root: Path, arch: str, size: int, precision: str, instances: int) -> Path:
    data = root / "data"
    write_demo_dataset(data, spec=DemoSpec(train_per_class=4, valid_per_class=8, image_size=size + 32))
    recipe = load_recipe(None, [f"model.arch={arch}", f"stages.0.size={size}", f"serve.precision={precision}",
                                "serve.engine=torch", "serve.decode=nvjpeg", "serve.max_batch_size=256",
                                f"serve.model_instances={instances}"])
    run = init_run(data, root / "run", recipe)
    export_pt2(run, precision=precision, aoti=False)
    return run


def in_process_img_s(decoder: DevicePreprocessor, model: TorchProbabilities, images: list[bytes], batch: int,
                     seconds: float) -> float:
    batch = min(batch, len(images))
    requests = [np.array(images[i : i + batch], dtype=object).reshape(-1, 1) for i in range(0, len(images) - batch + 1, batch)]
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for request in requests:
            pixels, _ = decoder.decode([request])
            model.on_device(pixels)
            done += len(request)
    return done / (time.perf_counter() - start)


def in_process_p50_ms(decoder: DevicePreprocessor, model: TorchProbabilities, images: list[bytes]) -> float:
    times = []
    for data in images:
        start = time.perf_counter()
        pixels, _ = decoder.decode([np.array([[data]], dtype=object)])
        model.on_device(pixels)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def in_process_parts_ms(decoder: DevicePreprocessor, model: TorchProbabilities, images: list[bytes],
                        batch: int, rounds: int = 5) -> dict[str, float]:
    """Median ms per batch of each in-process part alone: header checks and nvJPEG with the resize
    (``decode``), and the engine on those pixels (``engine``), each synchronised."""
    request = np.array(images[:batch], dtype=object).reshape(-1, 1)
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    decode, engine = [], []
    for _ in range(rounds):
        start = time.perf_counter()
        pixels, _ = decoder.decode([request])
        sync()
        middle = time.perf_counter()
        model.on_device(pixels)
        decode.append(middle - start)
        engine.append(time.perf_counter() - middle)
    return {"decode": round(statistics.median(decode) * 1000, 2), "engine": round(statistics.median(engine) * 1000, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet34")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--precision", default="fp16", choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--seconds", type=float, default=6.0, help="per served or in-process window")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--instances", type=int, default=2, help="instances of the fused decode + backbone step (stub processes)")
    args = parser.parse_args()
    device = device_here()
    images = photo_like_jpegs(args.images)
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = build_run(Path(tmp), args.arch, args.size, args.precision, args.instances)
        run = RunDir(run_dir)
        manifest = run.read()
        name = next(n for n, e in manifest.data["artifacts"].items() if e.get("variant", {}).get("engine") == "torch")
        model = TorchProbabilities("torch", run.artifact_path(manifest, name), "softmax")
        decoder = DevicePreprocessor(manifest.preprocess, device)
        in_process_img_s(decoder, model, images, 256, 1.0)  # warm up: cuDNN's algorithm search, nvJPEG's handles
        parts = in_process_parts_ms(decoder, model, images, 256)
        repo = build_repository(run_dir, Path(tmp) / "repo", engines={"backbone": "torch"}, decode="nvjpeg")
        state = Path(tmp) / "server"
        info = start_server(repo, state, ports=Ports.free(), supervise=False)
        served, local, served_c1, local_c1 = [], [], [], []
        try:
            url = info.grpc_url
            run_level(url, "grpc", "classifier", images, concurrency=64, batch=16, seconds=2.0)  # warm up
            for _ in range(args.rounds):
                served.append(run_level(url, "grpc", "classifier", images, concurrency=64, batch=16, seconds=args.seconds))
                local.append(in_process_img_s(decoder, model, images, 256, args.seconds))
                served_c1.append(run_level(url, "grpc", "classifier", images, concurrency=1, batch=1, requests=100))
                local_c1.append(in_process_p50_ms(decoder, model, images[:100]))
        finally:
            stop_server(state)
    served_img_s = statistics.median(level.throughput for level in served)
    local_img_s = statistics.median(local)
    print(json.dumps({
        "check": "serving_gpu", "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "arch": args.arch, "size": args.size,
        "precision": args.precision, "instances": args.instances, "engine": "torch (exported program)", "decode": ("nvJPEG" if device.type == "cuda" else "torchvision's CPU decoder") + ", fused with the backbone",
        "served_c64x16_img_s": round(served_img_s, 1), "in_process_b256_img_s": round(local_img_s, 1),
        "served_vs_in_process": round(served_img_s / local_img_s, 3),
        "served_c64x16_p50_ms": round(statistics.median(level.p50_ms for level in served), 2),
        "served_c1_p50_ms": round(statistics.median(level.p50_ms for level in served_c1), 2),
        "in_process_c1_p50_ms": round(statistics.median(local_c1), 2), "in_process_ms_per_b256": parts,
        "backbone_mean_batch": served[-1].server.get("backbone_image", {}).get("mean_batch"),
        "errors": sum(level.errors for level in served + served_c1),
    }))


if __name__ == "__main__":
    main()
