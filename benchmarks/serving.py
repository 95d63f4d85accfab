"""Serving benchmark: Triton against in-process ONNX Runtime and PyTorch on the same images.

    python benchmarks/serving.py [--run RUN_DIR] [--requests 48]

With no --run it builds a resnet34 run at 224x224 with its initial (random) weights, the size
users serve, from generated 320x240 JPEGs. It starts its own embedded Triton, then measures in
one process on the same images:

- Triton ``classifier`` (concurrency 1 and 16) and ``classifier_tta`` (concurrency 8);
- in-process ONNX Runtime doing the same work: the same preprocessing and the same ONNX files,
  one image at a time and in batches of 8, without and with TTA;
- in-process PyTorch (one image at a time, batches of 8).

Prints one JSON object with the figures and three ratios: triton_vs_ort (classifier_tta
throughput at concurrency 8 over in-process ORT TTA throughput in batches of 8),
latency_ratio_c1 (classifier p50 at concurrency 1 over in-process single-image p50, the two
interleaved request by request) and
mean_batch_c16 (the backbone's mean executed batch at concurrency 16). Goals on the 2-core CPU:
>= 0.9, <= 1.1, >= 4.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from clfpipe.contract.dataset import scan_split
from clfpipe.contract.engines import Variant
from clfpipe.contract.manifest import RunDir
from clfpipe.contract.preprocess import decode_to_pixels, normalize
from clfpipe.contract.recipe import load_recipe
from clfpipe.demo_data import DemoSpec, write_demo_dataset
from clfpipe.export.onnx_export import export_onnx
from clfpipe.nn.reference import load_run_model
from clfpipe.runtime.ort import make_session, run_graph
from clfpipe.serve.bench import run_level
from clfpipe.serve.client import Classifier
from clfpipe.serve.repository import build_repository
from clfpipe.serve.server import Ports, start_server, stop_server
from clfpipe.train.loop import init_run


def build_run(root: Path) -> Path:
    data = root / "data"
    write_demo_dataset(data, spec=DemoSpec(train_per_class=4, valid_per_class=16, image_size=320))
    recipe = load_recipe(None, ["stages.0.size=224", "serve.max_batch_size=32"])
    run = init_run(data, root / "run", recipe)
    for variant in (Variant(), Variant("fp32", True), Variant("fp32", True, True)):
        export_onnx(run, variant=variant)
    return run


def p50_ms(fn, items, repeat: int = 1) -> float:
    times = []
    for _ in range(repeat):
        for item in items:
            start = time.perf_counter()
            fn(item)
            times.append(time.perf_counter() - start)
    return float(np.median(times) * 1000)


def throughput(fn, items, batch: int) -> float:
    start = time.perf_counter()
    for i in range(0, len(items), batch):
        fn(items[i : i + batch])
    return len(items) / (time.perf_counter() - start)


def interleaved_p50(triton_fn, local_fn, items, rounds: int = 2) -> tuple[float, float]:
    """Median latency of both, alternating one call each on the same items: single timings on
    this machine drift by tens of percent minutes apart."""
    remote, local = [], []
    for _ in range(rounds):
        for item in items:
            for fn, out in ((triton_fn, remote), (local_fn, local)):
                start = time.perf_counter()
                fn(item)
                out.append(time.perf_counter() - start)
    return float(np.median(remote) * 1000), float(np.median(local) * 1000)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path)
    parser.add_argument("--requests", type=int, default=48, help="requests per Triton level")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = args.run or build_run(Path(tmp))
        run = RunDir(run_dir)
        manifest = run.read()
        spec = manifest.preprocess
        files = list(scan_split(run.data_dir(manifest), "valid", tuple(manifest.classes)).files)
        images = [f.read_bytes() for f in files]
        repo = build_repository(run_dir, Path(tmp) / "repo")
        state = Path(tmp) / "server"
        info = start_server(repo, state, ports=Ports.free())
        spin = manifest.recipe.serve.ort_spin  # the server's session settings, for a like-for-like comparison
        plain = make_session(run_dir / Variant("fp32", True).file_name, spin=spin)
        tta = make_session(run_dir / Variant("fp32", True, True).file_name, spin=spin)
        single = lambda data: run_graph(plain, decode_to_pixels([data], spec))  # noqa: E731
        batched = lambda chunk: run_graph(plain, decode_to_pixels(chunk, spec))  # noqa: E731
        batched_tta = lambda chunk: run_graph(tta, decode_to_pixels(chunk, spec))  # noqa: E731
        single(images[0]), batched_tta(images[:8])  # warm up
        try:
            url = info.http_url
            client = Classifier(url, "http")
            triton_c1_ms, ort_single_ms = interleaved_p50(lambda data: client.probabilities([data]), single, images)
            c1 = run_level(url, "http", "classifier", images, concurrency=1, requests=args.requests)
            # TTA throughput: Triton at concurrency 8 and in-process batches of 8, alternated 3 times
            tta_rounds, ort_rounds = [], []
            for _ in range(3):
                tta_rounds.append(run_level(url, "http", "classifier_tta", images, concurrency=8, requests=args.requests // 2))
                ort_rounds.append(throughput(batched_tta, images[: args.requests // 2], 8))
            tta8 = sorted(tta_rounds, key=lambda level: level.throughput)[1]
            ort_tta_b8 = float(np.median(ort_rounds))
            c16 = run_level(url, "http", "classifier", images, concurrency=16, requests=args.requests * 2)
        finally:
            stop_server(state)
        ort_b8 = throughput(batched, images, 8)
        model = load_run_model(run, manifest)
        with torch.inference_mode():
            to_torch = lambda chunk: torch.from_numpy(normalize(decode_to_pixels(chunk, spec), spec))  # noqa: E731
            torch_single_ms = p50_ms(lambda data: model(to_torch([data])), images[:24])
            torch_b8 = throughput(lambda chunk: model(to_torch(chunk)), images[:48], 8)

    backbone_c16 = c16.server.get("backbone", {})
    result = {
        "machine": f"{platform.machine()} {os.cpu_count()} cores", "arch": manifest.recipe.model.arch, "size": spec.crop,
        "images": len(images),
        "triton": {
            "classifier_c1": {"img_s": round(c1.throughput, 1), "p50_ms": round(c1.p50_ms, 2), "p99_ms": round(c1.p99_ms, 2),
                              "p50_ms_interleaved": round(triton_c1_ms, 2)},
            "classifier_tta_c8": {"img_s": round(tta8.throughput, 1), "p50_ms": round(tta8.p50_ms, 2),
                                  "backbone_tta_mean_batch": tta8.server.get("backbone_tta", {}).get("mean_batch")},
            "classifier_c16": {"img_s": round(c16.throughput, 1), "p50_ms": round(c16.p50_ms, 2),
                               "backbone_mean_batch": backbone_c16.get("mean_batch")},
        },
        "in_process": {
            "ort_single_p50_ms_interleaved": round(ort_single_ms, 2), "ort_batch8_img_s": round(ort_b8, 1),
            "ort_tta_batch8_img_s": round(ort_tta_b8, 1), "torch_single_p50_ms": round(torch_single_ms, 2),
            "torch_batch8_img_s": round(torch_b8, 1),
        },
        "triton_vs_ort": round(tta8.throughput / ort_tta_b8, 3),
        "latency_ratio_c1": round(triton_c1_ms / ort_single_ms, 3),
        "mean_batch_c16": round(backbone_c16.get("mean_batch") or 0.0, 2),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
