"""Seconds per head epoch on cached activations vs recomputing the frozen body (precompute=True).

    python benchmarks/precompute.py [--data DIR] [--size 64] [--epochs 3] [--batch 64] [--workers 2]

Prints one JSON object: cached_s, recompute_s, speedup (= recompute_s / cached_s). With no
--data it writes the demo dataset to a temporary folder. The cache is built before timing
(precompute pays that once per dataset/model/size, then every head epoch is cheap).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from clfpipe.contract.dataset import scan_split
from clfpipe.contract.recipe import load_recipe
from clfpipe.demo_data import DemoSpec, write_demo_dataset
from clfpipe.nn.models import build_model, set_trainable, train_mode
from clfpipe.train.stage import Context, StageData, make_optimizer, param_groups, pick_device


def head_epoch_seconds(data: StageData, model, stage) -> float:
    set_trainable(model, "head")
    optimizer = make_optimizer(stage, param_groups(model, stage.lr))
    train_mode(model)
    start = time.perf_counter()
    for batch in data.train_loader:
        loss = data.loss(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    if data.device.type == "cuda":
        torch.cuda.synchronize()  # the epoch ends when its last step has run, not when it was queued
    return time.perf_counter() - start


def median_epoch_seconds(data: StageData, model, stage, epochs: int) -> float:
    """The median of `epochs` timed epochs after one untimed (kernels chosen, workers started)."""
    head_epoch_seconds(data, model, stage)
    return sorted(head_epoch_seconds(data, model, stage) for _ in range(epochs))[epochs // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs per mode (median taken), after one untimed")
    parser.add_argument("--batch", type=int, default=64, help="batch size of both modes (recipes/resnet34.toml's)")
    parser.add_argument("--workers", type=int, default=2, help="loader workers of the recomputing mode")
    parser.add_argument("--images", type=int, default=360, help="generated training images (no --data)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = args.data or Path(tmp) / "data"
        if args.data is None:
            per_class = max(1, args.images // 3)
            write_demo_dataset(data_dir, spec=DemoSpec(train_per_class=per_class, valid_per_class=10,
                                                       image_size=max(96, args.size + args.size // 4)))
        recipe = load_recipe(None, [f"stages.0.size={args.size}", "stages.0.trainable=head", "stages.0.augment=none",
                                    "stages.0.optimizer=sgd", "stages.0.lr=1e-2", f"data.batch_size={args.batch}",
                                    f"data.num_workers={args.workers}",
                                    f"data.cache_dir={Path(tmp) / 'cache'}"])
        train, valid = scan_split(data_dir, "train"), scan_split(data_dir, "valid")
        ctx = Context(recipe, train, valid, pick_device("auto"), Path(tmp))
        torch.manual_seed(0)
        model = build_model(recipe.model, len(train.classes)).to(ctx.device)
        cached = StageData(model, replace(recipe.stages[0], precompute=True), 0, ctx)  # builds the cache
        recompute = StageData(model, recipe.stages[0], 0, ctx)
        stage = recipe.stages[0]
        cached_s = median_epoch_seconds(cached, model, stage, args.epochs)
        recompute_s = median_epoch_seconds(recompute, model, stage, args.epochs)
    print(json.dumps({
        "images": len(train), "size": args.size, "batch": args.batch, "workers": args.workers, "arch": recipe.model.arch, "device": str(ctx.device),
        "cached_s": round(cached_s, 4), "recompute_s": round(recompute_s, 3), "speedup": round(recompute_s / cached_s, 1),
    }))


if __name__ == "__main__":
    main()
