"""data.input_process against the threads, batch for batch, on this machine's device.

    python benchmarks/input_process_check.py [--batch 32] [--size 224] [--epochs 2]

Writes demo images into a temporary folder, builds the first stage's training input both ways (the
decode and augmentation threads in this process; the same in a spawned child, its batches handed
over through CUDA IPC on a GPU) and runs the same passes through both side by side: a pass left
after two batches (as lr_find leaves one), then --epochs seeded epochs. Each batch goes through a
convolution and a sum on the device before the next is asked for, as a step would use it. Prints
one JSON object: the pairs compared, whether every batch is the same to the bit, and the largest
difference. On CUDA this is the check that the IPC hand-over (the child's event, the release
thread) gives the steps whole batches.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import time
from pathlib import Path

import torch

from clfpipe.contract.dataset import scan_split
from clfpipe.contract.recipe import load_recipe
from clfpipe.demo_data import DemoSpec, write_demo_dataset
from clfpipe.nn.models import build_model
from clfpipe.train.stage import Context, StageData, pick_device


def lockstep(threads: StageData, process: StageData, epochs: int) -> dict:
    """The same passes through both stages' inputs side by side, each pair of batches compared on
    the device (nothing kept): a pass left after two batches (as lr_find leaves one), then
    ``epochs`` seeded epochs. Each batch goes through a convolution before the next is asked for,
    as a step would use it."""
    weight = torch.ones(8, 3, 3, 3, device=threads.device)
    seen = {"pairs": 0, "identical": len(threads.train_loader) == len(process.train_loader), "max_abs_diff": 0.0}

    def compare(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> None:
        for x in (a[0], b[0]):
            torch.nn.functional.conv2d(x.float(), weight).sum()  # queued work on the batch, as a step's
        seen["pairs"] += 1
        seen["identical"] = seen["identical"] and torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        seen["max_abs_diff"] = max(seen["max_abs_diff"], float((a[0].float() - b[0].float()).abs().max()))

    for stage in (threads, process):
        stage.seed_epoch(-1)
    started = [iter(threads.train_loader), iter(process.train_loader)]
    for _ in range(2):
        compare(next(started[0]), next(started[1]))
    for it in started:
        it.close()
    for epoch in range(epochs):
        for stage in (threads, process):
            stage.seed_epoch(epoch)
        for a, b in zip(threads.train_loader, process.train_loader):
            compare(a, b)
    return seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    device, start = pick_device("auto"), time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        write_demo_dataset(data, spec=DemoSpec(train_per_class=2 * args.batch, valid_per_class=1, image_size=320))
        train, valid = scan_split(data, "train"), scan_split(data, "valid")

        def context(input_process: bool) -> Context:
            recipe = load_recipe(None, [f"data.batch_size={args.batch}", f"data.num_workers={args.workers}", "data.decode=tensor",
                                        f"data.input_process={str(input_process).lower()}", f"stages.0.size={args.size}",
                                        "stages.0.augment=side_on", "stages.0.precompute=false"])
            return Context(recipe, train, valid, device, Path(tmp))

        def stage(ctx: Context) -> StageData:
            return StageData(build_model(ctx.recipe.model, 3).to(device), ctx.recipe.stages[0], 0, ctx)

        with contextlib.closing(context(False)) as one, contextlib.closing(context(True)) as other, \
                contextlib.closing(stage(one)) as threads, contextlib.closing(stage(other)) as process:
            result = lockstep(threads, process, args.epochs)
    print(json.dumps({"check": "input_process", "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                      "batch": args.batch, "size": args.size, **result, "seconds": round(time.perf_counter() - start, 1)}))


if __name__ == "__main__":
    main()
