"""What the training augmentation of one batch asks of the device: the work that a GPU would do,
counted on any device, and its time.

    python benchmarks/augment_cost.py [--data DIR] [--batch 256] [--size 224] [--image-size 384] [--policy side_on]

Prints one JSON object for the stage's augment step (``Augment``: the zoomed crops, turns,
lighting, flips and normalisation of decoded images, in the stage's layout: channels_last on
CUDA; --resample-dtype: the crops' products in that dtype instead of the device's,
``resample_dtype``): ``ops`` (ATen calls), ``kernels`` (those that
are not views: on CUDA, each is at least one kernel), ``gb_touched`` (the bytes of every kernel's
tensor arguments and results: a bandwidth-bound GPU's time is about this over its memory
bandwidth), ``matmul_gflop`` (the matrix products: the crops' in ``resample_dtype``, the turns'
grids in float32), ``ms`` (median wall time, synchronised), and on CUDA ``gpu_busy_ms`` (its
kernels' time from torch.profiler); in a dtype other than float32, how far its pixels are from
float32's on the same draws (``vs_float32_max_levels``, ``vs_float32_differing``). The counts are
the same on the CPU and the GPU: they say what a change does to a GPU's share where no GPU is at
hand. With no --data it writes demo images at --image-size pixels into a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode
from train_throughput import gpu_ms_each  # the sibling script's GPU busy time (benchmarks/ is the script's folder)

from clfpipe.contract.augment import AUGMENTS
from clfpipe.contract.dataset import scan_split
from clfpipe.contract.preprocess import PreprocessSpec
from clfpipe.demo_data import DemoSpec, write_demo_dataset
from clfpipe.nn.transforms import decode_batch, resample_dtype, train_pixels_batch
from clfpipe.train.data import Augment
from clfpipe.train.stage import pick_device


class Traffic(TorchDispatchMode):
    """Counts ATen calls, those that make a kernel (not views), and the bytes of their tensor
    arguments and results."""

    def __init__(self) -> None:
        super().__init__()
        self.ops, self.kernels, self.bytes = 0, 0, 0
        self.by_op: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        inputs = [t for t in tree_leaves((args, kwargs or {})) if isinstance(t, torch.Tensor)]
        outputs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        if func._schema.is_mutable or not _aliases(outputs, inputs):
            touched = sum(t.numel() * t.element_size() for t in inputs + outputs)
            self.kernels += 1
            self.bytes += touched
            self.by_op[func.__name__.split(".")[0]] += touched
        return out


def _aliases(outputs: list[torch.Tensor], inputs: list[torch.Tensor]) -> bool:
    """Every result shares an argument's memory: a view (``view``, ``expand``, also ``_unsafe_view``,
    which its schema does not declare one), no kernel."""
    storages = {t.untyped_storage().data_ptr() for t in inputs}
    return bool(outputs) and all(t.untyped_storage().data_ptr() in storages for t in outputs)


def wall_ms(fn: Callable[[], Any], device: torch.device, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1000)
    return round(statistics.median(times), 2)


def against_float32(images: list[torch.Tensor], policy: str, spec: PreprocessSpec, dtype: torch.dtype) -> dict[str, float]:
    """The same draws resampled in `dtype` and in float32: the largest difference in levels, and
    the share of values that differ."""
    a, b = (train_pixels_batch(images, AUGMENTS[policy], spec, torch.Generator().manual_seed(1), d) for d in (dtype, torch.float32))
    diff = (a - b).abs()
    return {"vs_float32_max_levels": diff.max().item(), "vs_float32_differing": round((diff > 0).float().mean().item(), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--image-size", type=int, default=384, help="generated demo images (no --data)")
    parser.add_argument("--policy", default="side_on", choices=sorted(AUGMENTS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--resample-dtype", choices=["float32", "float16"], help="the crops' products (default: the device's)")
    args = parser.parse_args()
    device = pick_device("auto")
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = args.data or Path(tmp) / "data"
        if args.data is None:
            write_demo_dataset(data_dir, spec=DemoSpec(train_per_class=-(-args.batch // 3), valid_per_class=1,
                                                       image_size=args.image_size))
        files = scan_split(data_dir, "train", verify=False).files[: args.batch]
        encoded = [torch.frombuffer(bytearray(Path(f).read_bytes()), dtype=torch.uint8) for f in files]
    images = decode_batch(encoded, device)
    spec = PreprocessSpec.for_size(args.size)
    generator = torch.Generator().manual_seed(0)  # every call draws anew: the counts are those of typical draws
    dtype = getattr(torch, args.resample_dtype) if args.resample_dtype else resample_dtype(device)

    channels_last = device.type == "cuda"  # the stage's layout: the model's (train.stage.StageData)
    # the stage's augment step, with that dtype
    augment = partial(Augment(spec, AUGMENTS[args.policy], generator, channels_last, resample=dtype), images)
    augment()  # warm: kernels chosen, memory cached
    with FlopCounterMode(display=False) as flops, Traffic() as traffic:
        augment()
    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "batch": len(images), "size": args.size,
        "image_sizes": len({tuple(img.shape[-2:]) for img in images}), "policy": args.policy,
        "resample_dtype": str(dtype).removeprefix("torch."), "channels_last": channels_last,
        "ops": traffic.ops, "kernels": traffic.kernels, "gb_touched": round(traffic.bytes / 1e9, 2),
        "gb_by_op": {op: round(b / 1e9, 2) for op, b in traffic.by_op.most_common(8)},
        "matmul_gflop": round(flops.get_total_flops() / 1e9, 2), "ms": wall_ms(augment, device, args.repeats),
    }
    if dtype != torch.float32:
        result.update(against_float32(images, args.policy, spec, dtype))
    if device.type == "cuda":
        result["gpu_busy_ms"] = gpu_ms_each(lambda _: augment(), [None])
    print(json.dumps(result))


if __name__ == "__main__":
    main()
