"""Stages chained: ``run`` (train, export, repo) and the ``demo`` that serves and checks it."""

from __future__ import annotations

import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator


from clfpipe.agreement import Agreement, compare
from clfpipe.dataset import scan_data, scan_split
from clfpipe.demo_data import write_demo_dataset
from clfpipe.errors import ServeError
from clfpipe.inference import files_to_batch, load_run_model, probabilities, torch_logits
from clfpipe.manifest import RunDir
from clfpipe.recipe import Recipe
from export.onnx_export import export_variants
from export.variants import Variant
from serve.client import Classifier
from serve.repository import build_repository
from serve.server import Ports, start_server, stop_server
from train.loop import train_run

Log = Callable[[str], None]


@dataclass
class StageTimer:
    """Wall-clock seconds per named stage, in order."""

    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = time.perf_counter() - start

    def table(self) -> str:
        rows = [f"  {name:<10} {secs:7.1f} s" for name, secs in self.seconds.items()]
        return "\n".join(rows + [f"  {'total':<10} {sum(self.seconds.values()):7.1f} s"])


def run_pipeline(data_dir: Path, run_dir: Path, recipe: Recipe, log: Log = print, timer: StageTimer | None = None) -> Path:
    """Train, export (with its agreement gate) and build the Triton repository."""
    timer = timer or StageTimer()
    with timer.stage("train"):
        train_run(data_dir, run_dir, recipe, log)
    precision = recipe.serve.precision
    # the plain fp32 graph (the reference export), then what the server runs: uint8 pixels in,
    # without and with TTA
    variants = [Variant(), Variant(precision, fold_preprocess=True), Variant(precision, fold_preprocess=True, fold_tta=True)]
    with timer.stage("export"):
        export_variants(run_dir, variants, data_dir, log)
    with timer.stage("repo"):
        return build_repository(run_dir, log=log)


def init_run(data_dir: Path, run_dir: Path, recipe: Recipe, log: Log = print) -> Path:
    """A run with the recipe's model at its initial (seeded or pretrained) weights and no training:
    for benchmarks and for serving checks that need the real size but not a trained model."""
    from clfpipe.models import build_model
    from train.loop import commit_checkpoint, prepare_run, seed_everything

    train = scan_data(data_dir, "train", recipe.data.labels_csv)
    prepare_run(data_dir, run_dir, recipe)
    seed_everything(recipe.seed)
    model = build_model(recipe.model, len(train.classes))
    commit_checkpoint(model, run_dir, recipe, list(train.classes), data_dir, {"epochs": 0, "note": "initial weights, not trained"})
    log(f"init: {recipe.model.arch} at its initial weights -> {run_dir}")
    return run_dir


def _served_vs(run_dir: Path, client: Classifier, files: list[Path], reference: Callable) -> Agreement:
    """Triton's probabilities for the files against reference(model, manifest), at the export tolerance."""
    run = RunDir(run_dir)
    manifest = run.read()
    expected = reference(load_run_model(run, manifest), manifest)
    served = client.probabilities([f.read_bytes() for f in files], [str(f) for f in files])
    return compare(expected, served, manifest.recipe.export.rtol, manifest.recipe.export.atol)


def served_agreement(run_dir: Path, client: Classifier, files: list[Path]) -> Agreement:
    """Triton's probabilities vs PyTorch's on the same files."""
    def reference(model, manifest):
        logits = torch_logits(model, files_to_batch(files, manifest.preprocess))
        return probabilities(logits, manifest.recipe.multi_label)

    return _served_vs(run_dir, client, files, reference)


def served_tta_agreement(run_dir: Path, client: Classifier, files: list[Path]) -> Agreement:
    """Triton's classifier_tta against train.evaluate's deterministic TTA on the same files."""
    import torch

    from clfpipe.dataset import Split
    from train.evaluate import deterministic_tta

    def reference(model, manifest):
        split = Split(tuple(files), tuple(0 for _ in files), tuple(manifest.classes))
        return deterministic_tta(model, split, manifest.preprocess, 32, torch.device("cpu"))

    return _served_vs(run_dir, client, files, reference)


def _sample(files: list[Path], labels: list[int], per_class: int) -> list[Path]:
    picked: list[Path] = []
    for label in sorted(set(labels)):
        picked += [f for f, l in zip(files, labels) if l == label][:per_class]
    return picked


def run_demo(workdir: Path, recipe: Recipe, ports: Ports = Ports(), seed: int = 0, log: Log = print) -> dict[str, float]:
    """The whole product on the demo data; returns the seconds per stage."""
    timer = StageTimer()
    data_dir, run_dir = workdir / "data", workdir / "run"
    shutil.rmtree(run_dir, ignore_errors=True)  # the demo owns its workdir: start clean
    with timer.stage("data"):
        counts = write_demo_dataset(data_dir, seed)
        log(f"data: {counts['train']} train / {counts['valid']} valid JPEGs -> {data_dir}")
    repo = run_pipeline(data_dir, run_dir, recipe, log, timer)
    valid = scan_split(data_dir, "valid")
    state_dir = workdir / "server"
    with timer.stage("serve up"):
        info = start_server(repo, state_dir, ports=ports)
        log(f"serve: tritonserver pid {info.pid} ready, http {info.http_url}, grpc {info.grpc_url}")
    try:
        with timer.stage("predict"):
            for protocol, url in (("http", info.http_url), ("grpc", info.grpc_url)):
                client = Classifier(url, protocol)
                log(f"\npredict over {protocol} ({url}):")
                for p in client.predict(_sample(list(valid.files), list(valid.labels), 2), top_k=1):
                    log(f"  {Path(p.file).parent.name + '/' + Path(p.file).name:<28} -> {p.label:<11} {p.prob:.3f}")
                agreement = served_agreement(run_dir, client, list(valid.files))
                log(f"  Triton ({protocol}) vs PyTorch probabilities on {agreement.summary()}")
                if not agreement.passed:
                    raise ServeError(f"Triton over {protocol} disagrees with PyTorch: {agreement.summary()}")
            tta = served_tta_agreement(run_dir, Classifier(info.http_url, "http", "classifier_tta"), list(valid.files))
            log(f"\nclassifier_tta (http) vs the training side's deterministic TTA on {tta.summary()}")
    finally:
        with timer.stage("serve down"):
            stop_server(state_dir)
    manifest = RunDir(run_dir).read()
    onnx_agreement = manifest.stage("export")["agreement"]
    scores = manifest.stage("train")["accuracy"]
    log("\nvalid accuracy (PyTorch): " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
    log(f"PyTorch vs ONNX Runtime: top-1 agreement {onnx_agreement['top1_agreement']:.4f}, "
        f"max |logit diff| {onnx_agreement['max_abs_diff']:.3g} (tolerance {onnx_agreement['tolerance']:.3g})")
    log(f"\nstage times:\n{timer.table()}")
    return timer.seconds
