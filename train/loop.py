"""The training stage: run the recipe's stages, then commit checkpoint and manifest."""

from __future__ import annotations

import csv
import io
import random
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from clfpipe.dataset import Split, scan_split
from clfpipe.errors import ManifestError
from clfpipe.inference import CHECKPOINT
from clfpipe.manifest import Manifest, RunDir, atomic_write_bytes, library_versions, new_manifest
from clfpipe.models import Classifier, build_model, set_trainable, train_mode
from clfpipe.preprocess import PreprocessSpec
from clfpipe.recipe import Recipe, RecipeError, StageConfig, dump_recipe
from train.data import ImageDataset, make_loader
from train.schedule import multiplier, sgdr_cycles

TRAIN_VERSIONS = ("torch", "torchvision", "numpy", "pillow")
METRIC_FIELDS = ("stage", "epoch", "lr", "train_loss", "valid_loss", "accuracy", "seconds")


@dataclass(frozen=True)
class EpochMetrics:
    stage: str
    epoch: int
    lr: float
    train_loss: float
    valid_loss: float
    accuracy: float
    seconds: float


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RecipeError("data.device: expected a CUDA device, got none (torch.cuda.is_available() is False)")
    return torch.device(name)


def param_groups(model: Classifier, lrs: tuple[float, ...]) -> list[dict]:
    """One optimizer group per layer group with trainable parameters; one lr or one per group."""
    per_group = lrs * 3 if len(lrs) == 1 else lrs
    groups = []
    for group, lr in zip(model.layer_groups(), per_group):
        params = [p for p in group.parameters() if p.requires_grad]
        if params:
            groups.append({"params": params, "lr": lr, "peak_lr": lr})
    return groups


def make_optimizer(stage: StageConfig, groups: list[dict]) -> torch.optim.Optimizer:
    if stage.optimizer == "sgd":
        return torch.optim.SGD(groups, momentum=stage.momentum, weight_decay=stage.weight_decay)
    return torch.optim.AdamW(groups, weight_decay=stage.weight_decay)


@torch.inference_mode()
def evaluate(model: Classifier, loader, device: torch.device) -> tuple[float, float]:
    """Mean cross-entropy and accuracy on a loader."""
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        logits = model(x)
        loss_sum += nn.functional.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
        count += len(y)
    return loss_sum / count, correct / count


def run_stage(model: Classifier, stage: StageConfig, train: Split, valid: Split, recipe: Recipe, device: torch.device) -> list[EpochMetrics]:
    """Train one stage of the recipe; returns one metrics row per epoch."""
    spec = PreprocessSpec(resize=round(stage.size * recipe.data.resize_scale), crop=stage.size)
    if stage.schedule == "sgdr":
        sgdr_cycles(stage.epochs, stage.cycle_len, stage.cycle_mult)  # fail before training, not after
    set_trainable(model, stage.trainable)
    optimizer = make_optimizer(stage, param_groups(model, stage.lr))
    train_loader = make_loader(ImageDataset(train, spec, stage.augment), recipe.data.batch_size, True, recipe.data.num_workers, recipe.seed)
    valid_loader = make_loader(ImageDataset(valid, spec), recipe.data.batch_size, False, recipe.data.num_workers, recipe.seed)
    steps_per_epoch, step, rows = len(train_loader), 0, []
    for epoch in range(stage.epochs):
        start, losses = time.perf_counter(), []
        train_mode(model)
        # disable=None: a bar on a terminal, none in logs (epoch lines are printed either way).
        bar = tqdm(train_loader, desc=f"{stage.name} {epoch + 1}/{stage.epochs}", leave=False, dynamic_ncols=True, disable=None)
        for x, y in bar:
            scale = multiplier(stage.schedule, step, steps_per_epoch, stage.epochs, stage.cycle_len, stage.cycle_mult)
            for group in optimizer.param_groups:
                group["lr"] = group["peak_lr"] * scale
            loss = nn.functional.cross_entropy(model(x.to(device)), y.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{np.mean(losses[-10:]):.3f}")
            step += 1
        valid_loss, accuracy = evaluate(model, valid_loader, device)
        rows.append(EpochMetrics(stage.name, epoch + 1, optimizer.param_groups[-1]["lr"], float(np.mean(losses)),
                                 valid_loss, accuracy, time.perf_counter() - start))
        r = rows[-1]
        tqdm.write(f"{r.stage} epoch {r.epoch}/{stage.epochs}: train_loss {r.train_loss:.4f} "
                   f"valid_loss {r.valid_loss:.4f} accuracy {r.accuracy:.4f} ({r.seconds:.1f}s)")
    return rows


def _metrics_csv(rows: list[EpochMetrics]) -> bytes:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(METRIC_FIELDS)
    for r in rows:
        writer.writerow([getattr(r, f) for f in METRIC_FIELDS])
    return buf.getvalue().encode()


def _state_dict_bytes(model: nn.Module) -> bytes:
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buf)
    return buf.getvalue()


def train_run(data_dir: Path, run_dir: Path, recipe: Recipe, log: Callable[[str], None] = print) -> Manifest:
    """Train on DATA/train, validate on DATA/valid, write RUN_DIR with its manifest last."""
    run = RunDir(run_dir)
    if run.exists():
        raise ManifestError(f"{run_dir} already holds a run (manifest.json): expected a new run directory")
    train_split = scan_split(data_dir, "train")
    valid_split = scan_split(data_dir, "valid", classes=train_split.classes)
    device = pick_device(recipe.data.device)
    log(f"train: {len(train_split)} train / {len(valid_split)} valid images, classes {list(train_split.classes)}, "
        f"{recipe.model.arch} on {device}")
    seed_everything(recipe.seed)
    model = build_model(recipe.model, len(train_split.classes)).to(device)
    rows: list[EpochMetrics] = []
    start = time.perf_counter()
    for stage in recipe.stages:
        rows += run_stage(model, stage, train_split, valid_split, recipe, device)
    seconds = time.perf_counter() - start

    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = run_dir / "model.pt"
    atomic_write_bytes(checkpoint, _state_dict_bytes(model))
    atomic_write_bytes(run_dir / "metrics.csv", _metrics_csv(rows))
    atomic_write_bytes(run_dir / "recipe.resolved.toml", dump_recipe(recipe).encode())
    manifest = new_manifest(recipe, list(train_split.classes), data_dir)
    manifest = manifest.with_artifact(CHECKPOINT, run_dir, checkpoint, "train", library_versions(TRAIN_VERSIONS))
    manifest = manifest.with_stage("train", {
        "valid_accuracy": rows[-1].accuracy,
        "valid_loss": rows[-1].valid_loss,
        "epochs": len(rows),
        "seconds": round(seconds, 2),
        "device": str(device),
        "train_images": len(train_split),
        "valid_images": len(valid_split),
    })
    run.write(manifest)
    log(f"train: valid accuracy {rows[-1].accuracy:.4f} after {len(rows)} epochs ({seconds:.1f}s) -> {run_dir}")
    return manifest


def with_stage_override(recipe: Recipe, **changes) -> Recipe:
    """A copy of the recipe with every stage changed (used by tests and benchmarks)."""
    return replace(recipe, stages=tuple(replace(s, **changes) for s in recipe.stages))
