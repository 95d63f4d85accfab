"""resnext50 against resnet34: a training step's time and memory, and inference throughput.

    python benchmarks/archs.py [--size 224] [--batch 32] [--steps 5] [--archs resnet34,resnext50_32x4d]

The seed notes say resnext50 "takes twice as long to run as resnet34" and "takes 2-3x the
memory". Each architecture runs in a fresh process of its own, so that its peak memory is its
alone: clfpipe's classifier (the body and fastai's head), every layer trainable, SGD with momentum
as the recipes train, on random images of the given size, as training runs on this device (bf16
autocast and channels_last on CUDA, float32 on the CPU). Prints one JSON object: per architecture
the median step's seconds (after one untimed), inference images a second, and the training
memory (CUDA: torch's peak allocation; CPU: the process's peak resident memory less what it held
before the model was built), then the ratios of the second architecture to the first.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch

from clfpipe.contract.recipe import ModelConfig, StageConfig
from clfpipe.nn.models import build_model, set_trainable, train_mode
from clfpipe.train.stage import autocast, criterion, make_optimizer, param_groups, pick_device

CLASSES = 10


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def measure(arch: str, size: int, batch: int, steps: int) -> dict:
    """One architecture in this process: step seconds, inference img/s, training memory."""
    device = pick_device("auto")
    before = _peak_rss_mb()
    model = build_model(ModelConfig(arch=arch, weights="none"), CLASSES).to(device)
    layout = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    model = model.to(memory_format=layout)
    set_trainable(model, "all")
    stage = StageConfig(optimizer="sgd", lr=(1e-3,))
    optimizer = make_optimizer(stage, param_groups(model, stage.lr))
    x = torch.randn(batch, 3, size, size, device=device).to(memory_format=layout)
    y = torch.randint(0, CLASSES, (batch,), device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step() -> float:
        start = time.perf_counter()
        with autocast(device):
            loss = criterion(model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        _sync(device)
        return time.perf_counter() - start

    train_mode(model)
    step()  # untimed: kernels chosen, buffers allocated
    step_s = statistics.median(step() for _ in range(steps))
    memory = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else _peak_rss_mb() - before
    model.eval()
    with torch.inference_mode(), autocast(device):
        model(x)
        _sync(device)
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            model(x)
            _sync(device)
            times.append(time.perf_counter() - start)
    return {"device": str(device), "step_s": round(step_s, 4), "train_img_s": round(batch / step_s, 1),
            "infer_img_s": round(batch / statistics.median(times), 1), "train_memory_mb": round(memory, 1),
            "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5, help="timed steps (median taken), after one untimed")
    parser.add_argument("--archs", default="resnet34,resnext50_32x4d", help="comma-separated; ratios are of the second to the first")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # one architecture, in the process the parent started
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.size, args.batch, args.steps)))
        return
    archs = args.archs.split(",")
    results = {}
    for arch in archs:
        done = subprocess.run([sys.executable, __file__, "--child", arch, "--size", str(args.size), "--batch", str(args.batch),
                               "--steps", str(args.steps)], capture_output=True, text=True, check=True)
        results[arch] = json.loads(done.stdout.strip().splitlines()[-1])
    out = {"machine": f"{platform.machine()} {torch.get_num_threads()} threads", "size": args.size, "batch": args.batch,
           "archs": results}
    if len(archs) >= 2:
        first, second = results[archs[0]], results[archs[1]]
        out["time_ratio"] = round(second["step_s"] / first["step_s"], 2)
        out["memory_ratio"] = round(second["train_memory_mb"] / first["train_memory_mb"], 2)
        out["infer_ratio"] = round(first["infer_img_s"] / second["infer_img_s"], 2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
