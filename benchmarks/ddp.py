"""The demo recipe on one process and on N processes under torchrun (gloo on the CPU, NCCL on GPUs).

    python benchmarks/ddp.py [--nproc 2] [--recipe recipes/demo.toml] [--set KEY=VALUE ...]

Trains the same recipe on the same demo data twice, one after the other, and prints one JSON
object: wall seconds and validation accuracy of each, and their ratios. data.batch_size is the
global batch either way, so the two runs take the same optimizer steps. On a machine with fewer
cores than processes the ranks share them: the figure says what DDP costs there, not what it gains.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from clfpipe.contract.manifest import RunDir
from clfpipe.demo_data import write_demo_dataset


def timed_train(data: Path, run: Path, recipe: Path, sets: list[str], nproc: int, cache: Path) -> tuple[float, dict]:
    argv = [sys.executable, "-m", "clfpipe", "-q", "train", "--data", str(data), "--run", str(run), "--recipe", str(recipe),
            "--nproc", str(nproc), "--set", f"data.cache_dir={cache}", *[a for s in sets for a in ("--set", s)]]
    start = time.perf_counter()
    subprocess.run(argv, check=True)
    return time.perf_counter() - start, RunDir(run).read().stage("train")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--recipe", type=Path, default=Path(__file__).resolve().parent.parent / "recipes" / "demo.toml")
    parser.add_argument("--set", action="append", default=[], help="recipe overrides for both runs")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        write_demo_dataset(data)
        one_s, one = timed_train(data, Path(tmp) / "one", args.recipe, args.set, 1, Path(tmp) / "cache1")
        many_s, many = timed_train(data, Path(tmp) / "many", args.recipe, args.set, args.nproc, Path(tmp) / "cache2")
    print(json.dumps({
        "machine": f"{platform.machine()} {os.cpu_count()} cores", "nproc": args.nproc, "recipe": args.recipe.name,
        "one_process": {"seconds": round(one_s, 1), "accuracy": one["accuracy"]},
        f"{args.nproc}_processes": {"seconds": round(many_s, 1), "accuracy": many["accuracy"]},
        "time_ratio": round(many_s / one_s, 3),
        "accuracy_delta": round(many["valid_accuracy"] - one["valid_accuracy"], 4),
    }))


if __name__ == "__main__":
    main()
