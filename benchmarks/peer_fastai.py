"""clfpipe's recipe against fastai v2's standard path on the same folder, same architecture and
image size, one after the other, each in its own child process of this one.

    python benchmarks/peer_fastai.py --data DIR [--weights none|imagenet] [--size 64] [--seeds 0,1,2] [--recipe R] [--set K=V ...]

fastai: ``ImageDataLoaders.from_folder`` (``Resize(size)``, ``aug_transforms``), ``vision_learner``
(resnet34), ``lr_find`` valley, then ``fit_one_cycle(epochs)`` from scratch or ``fine_tune(epochs)``
from ImageNet weights, then ``tta()``. clfpipe: ``train`` with the recipe (default
``recipes/peer.toml``) at the final size --size, evaluating plain and fastai-style TTA. Wall time
is from reading the folder to the TTA accuracy, imports excluded, on both sides. Prints one JSON
line with both top-1s, both TTA top-1s, both wall times, and time_ratio = clfpipe / fastai (goal
<= 0.8) with the accuracy differences (goal >= 0). With several --seeds (fastai's ``set_seed`` and
the recipe's ``seed``), one such line per seed, then one with the means over the seeds: on a few
hundred validation images one seed's top-1 moves by a point or two. Needs the peer extra:
``pip install -e '.[peer]'``. ImageNet weights come from torch's hub cache on both sides (no
network here): ``--weights imagenet`` fails in one line when they are not there.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_fastai(data: Path, size: int, weights: str, epochs: int, batch: int, seed: int) -> dict:
    from fastai.vision.all import ImageDataLoaders, Resize, accuracy, aug_transforms, resnet34, set_seed, valley, vision_learner

    set_seed(seed, reproducible=True)
    start = time.perf_counter()
    dls = ImageDataLoaders.from_folder(data, train="train", valid="valid", item_tfms=Resize(size),
                                       batch_tfms=aug_transforms(size=size), bs=batch)
    learn = vision_learner(dls, resnet34, pretrained=weights == "imagenet", metrics=accuracy)
    with learn.no_bar(), learn.no_logging():
        lr = float(learn.lr_find(suggest_funcs=(valley,), show_plot=False).valley)
        if weights == "imagenet":
            learn.fine_tune(epochs, base_lr=lr)
        else:
            learn.fit_one_cycle(epochs, lr)
        top1 = float(learn.validate()[1])
        preds, targets = learn.tta()
    tta = float((preds.argmax(1) == targets).float().mean())
    return {"top1": top1, "tta_top1": tta, "seconds": time.perf_counter() - start, "lr": lr, "epochs": epochs}


def profiled(fn, top: int) -> tuple[object, list[list]]:
    """fn() under cProfile, and clfpipe's functions with the most cumulative time: [[file:line(name), s], ...]."""
    import cProfile
    import pstats

    profile = cProfile.Profile()
    result = profile.runcall(fn)
    stats = pstats.Stats(profile).stats  # type: ignore[attr-defined]
    ours = [(f"{Path(file).parent.name}/{Path(file).name}:{line}({name})", cumulative)
            for (file, line, name), (_, _, _, cumulative, _) in stats.items() if "clfpipe" in file or "/train/" in file]
    return result, [[where, round(t, 2)] for where, t in sorted(ours, key=lambda x: -x[1])[:top]]


def run_clfpipe(data: Path, size: int, weights: str, recipe_path: Path, overrides: list[str], profile: int = 0) -> dict:
    from clfpipe.contract.recipe import load_recipe
    from clfpipe.train.loop import train_run

    recipe = load_recipe(recipe_path, [f"model.weights={weights}", *overrides])
    if recipe.final_size() != size:
        raise SystemExit(f"peer_fastai: the recipe's final size is {recipe.final_size()}, expected --size {size} "
                         "(set the stages' sizes with --set)")
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        run = lambda: train_run(data, Path(tmp) / "run", recipe)  # noqa: E731
        manifest, top = profiled(run, profile) if profile else (run(), None)
        seconds = time.perf_counter() - start
    accuracy = manifest.stage("train")["accuracy"]
    return {"top1": accuracy["plain"], "tta_top1": accuracy.get("tta_fastai"), "seconds": seconds,
            "epochs": sum(s.epochs for s in recipe.stages), "training_seconds": manifest.stage("train")["seconds"],
            **({"profile_cumulative_s": top} if top else {})}


def child(args: argparse.Namespace) -> dict:
    if args.only == "fastai":
        return run_fastai(args.data, args.size, args.weights, args.epochs, args.batch, args.seed)
    return run_clfpipe(args.data, args.size, args.weights, args.recipe, args.set or [], args.profile)


def _side(args: argparse.Namespace, side: str, seed: int) -> dict:
    """One side's run in a child process (its imports and memory its own)."""
    argv = [sys.executable, __file__, "--data", str(args.data), "--weights", args.weights, "--size", str(args.size),
            "--epochs", str(args.epochs), "--batch", str(args.batch), "--recipe", str(args.recipe), "--seed", str(seed),
            *[a for kv in [*(args.set or []), f"seed={seed}"] for a in ("--set", kv)], "--only", side,
            *(["--profile", str(args.profile)] if side == "clfpipe" and args.profile else [])]
    out = subprocess.run(argv, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"peer_fastai: the {side} run (seed {seed}) failed: {(out.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def compare(fa: dict, cp: dict) -> dict:
    """Both sides' figures, the time ratio (goal <= 0.8) and the accuracy differences (goal >= 0)."""
    rounded = lambda d: {k: round(v, 4) if isinstance(v, float) else v for k, v in d.items()}  # noqa: E731
    return {"fastai": rounded(fa), "clfpipe": rounded(cp), "time_ratio": round(cp["seconds"] / fa["seconds"], 3),
            "top1_diff": _diff(cp["top1"], fa["top1"]), "tta_top1_diff": _diff(cp["tta_top1"] or 0, fa["tta_top1"])}


def _diff(a: float, b: float) -> float:
    """a - b to 4 places; fastai's accuracy is a float32, ours a float64: the same images count as 0."""
    return round(round(a, 4) - round(b, 4), 4) + 0.0  # + 0.0: no "-0.0"


def mean_of(runs: list[dict]) -> dict:
    keys = ("top1", "tta_top1", "seconds")
    return {k: statistics.mean(r[k] or 0 for r in runs) for k in keys}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="a folder with train/<class>/ and valid/<class>/")
    parser.add_argument("--weights", choices=["none", "imagenet"], default="none")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=5, help="fastai's fit_one_cycle / fine_tune epochs")
    parser.add_argument("--batch", type=int, default=64, help="fastai's batch size (its default)")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds, each run on both sides (default: 0)")
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "peer.toml")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="clfpipe recipe overrides")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="run clfpipe's side under cProfile and print its N costliest functions (cumulative "
                             "seconds; the profiler slows the run, so its time is not the comparison's)")
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)  # the child's seed
    parser.add_argument("--only", choices=["fastai", "clfpipe"],
                        help="run one side alone, in this process, and print its figures (what each child runs; "
                             "scripts/gpu_check.sh profiles clfpipe's side so)")
    args = parser.parse_args()
    if args.only:
        print(json.dumps(child(args)))
        return
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        parser.error(f"expected --seeds as comma-separated integers, got {args.seeds!r}")
    head = {"data": str(args.data), "weights": args.weights, "size": args.size, "arch": "resnet34"}
    runs = []
    for seed in seeds:
        fa, cp = _side(args, "fastai", seed), _side(args, "clfpipe", seed)
        runs.append((fa, cp))
        print(json.dumps({**head, "seed": seed, **compare(fa, cp)}), flush=True)
    if len(seeds) > 1:
        summary = compare(mean_of([fa for fa, _ in runs]), mean_of([cp for _, cp in runs]))
        wins = sum(_diff(cp["top1"], fa["top1"]) >= 0 for fa, cp in runs)
        print(json.dumps({**head, "seeds": seeds, "mean": True, **summary, "clfpipe_top1_at_least_fastai": f"{wins}/{len(seeds)}"}))


if __name__ == "__main__":
    main()
