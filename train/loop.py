"""The training stage: run the recipe's stages, evaluate, then commit checkpoint and manifest.

Every epoch ends with an atomic ``train_state.pt`` (weights, optimizer, position in the
recipe), so ``clfpipe train --resume RUN_DIR`` continues a killed run with the same schedule.
Each epoch seeds its own shuffling and augmentation from (seed, stage, epoch), so a resumed run
draws the same batches as an uninterrupted one. The manifest is written last.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import io
import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm import tqdm

from clfpipe.dataset import Split, scan_data
from clfpipe.errors import ManifestError
from clfpipe.inference import CHECKPOINT, probabilities
from clfpipe.manifest import Manifest, RunDir, atomic_write_bytes, library_versions, new_manifest
from clfpipe.models import Classifier, build_model, set_trainable, train_mode
from clfpipe.preprocess import PreprocessSpec
from clfpipe.recipe import Recipe, RecipeError, StageConfig, dump_recipe, load_recipe
from train.data import ImageDataset, make_loader
from train.evaluate import evaluate
from train.metrics import accuracy, f2_score
from train.lr_find import LrFindResult, lr_find, plot_lr_find
from train.precompute import FeatureCache, cached_features, default_cache_dir
from train.report import write_report
from train.schedule import multiplier, schedule_values, sgdr_cycles
from clfpipe.gpu_decode import decode_batch
from train.tensor_data import augment_batch, encoded_loader

TRAIN_VERSIONS = ("torch", "torchvision", "numpy", "pillow")
METRIC_FIELDS = ("stage", "epoch", "lr", "train_loss", "valid_loss", "metric", "seconds")
STATE_FILE = "train_state.pt"
Log = Callable[[str], None]


@dataclass(frozen=True)
class EpochMetrics:
    stage: str
    epoch: int
    lr: float
    train_loss: float
    valid_loss: float
    metric: float  # accuracy, or F2 at threshold 0.2 for multi-label
    seconds: float


@dataclass
class Context:
    """What every stage needs: the run's fixed inputs."""

    recipe: Recipe
    train: Split
    valid: Split
    device: torch.device
    run_dir: Path
    log: Log


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RecipeError("data.device: expected a CUDA device, got none (torch.cuda.is_available() is False)")
    return torch.device(name)


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA where supported; plain fp32 on the CPU."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def criterion(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy for class indices; BCE for multi-hot targets (multi-label)."""
    if y.dim() == 2:
        return nn.functional.binary_cross_entropy_with_logits(logits, y.float())
    return nn.functional.cross_entropy(logits, y)


def on_device_decode(decode: str, device: torch.device) -> bool:
    return decode == "tensor" or (decode == "auto" and device.type == "cuda")


def stage_spec(recipe: Recipe, stage: StageConfig) -> PreprocessSpec:
    return PreprocessSpec(resize=round(stage.size * recipe.data.resize_scale), crop=stage.size)


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


class StageData:
    """Batches and forward pass of one stage: images through the model, or cached activations
    through the head only (precompute)."""

    def __init__(self, model: Classifier, stage: StageConfig, index: int, ctx: Context) -> None:
        recipe, spec = ctx.recipe, stage_spec(ctx.recipe, stage)
        self.model, self.device, self.seed = model, ctx.device, recipe.seed * 1000 + index * 100
        self.spec, self.augment, self.augment_gen = spec, stage.augment, torch.Generator()
        self.tensor_decode = not stage.precompute and on_device_decode(recipe.data.decode, ctx.device)
        bs, workers = recipe.data.batch_size, recipe.data.num_workers
        if stage.precompute:
            if stage.augment != "none":
                ctx.log(f"warning: stage {stage.name!r}: augment={stage.augment!r} has no effect while precompute=true "
                        "(the same activations are shown every epoch)")
            cache = FeatureCache(default_cache_dir(recipe.data.cache_dir))
            tensors = []
            for split in (ctx.train, ctx.valid):
                result = cached_features(model, split, spec, cache, bs, ctx.device)
                ctx.log(f"precompute: {len(split)} images, cache {result.status} ({cache.root / result.key}.npy)")
                tensors.append(TensorDataset(torch.from_numpy(result.features), torch.tensor(split.labels)))
            self.generator = torch.Generator()
            self.train_loader = DataLoader(tensors[0], bs, shuffle=True, drop_last=len(tensors[0]) > bs, generator=self.generator)
            self.valid_loader = DataLoader(tensors[1], bs)
            self.forward = model.head[2:]
        elif self.tensor_decode:
            self.train_loader = encoded_loader(ctx.train, bs, workers, recipe.seed)
            self.generator = self.train_loader.generator
        else:
            self.train_loader = make_loader(ImageDataset(ctx.train, spec, stage.augment), bs, True, workers, recipe.seed)
            self.generator = self.train_loader.generator
        if not stage.precompute:
            self.valid_loader = make_loader(ImageDataset(ctx.valid, spec), bs, False, workers, recipe.seed)
            self.forward = model
        self.channels_last = ctx.device.type == "cuda" and not stage.precompute

    def to_input(self, x: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        if self.tensor_decode:  # encoded bytes: decode and augment on the device
            return augment_batch(decode_batch(x, self.device), self.spec, self.augment, self.augment_gen)
        return x.to(self.device, non_blocking=True)

    def seed_epoch(self, epoch: int) -> None:
        """Shuffle order and augmentation depend on (seed, stage, epoch) only: resumable."""
        self.generator.manual_seed(self.seed + epoch)
        self.augment_gen.manual_seed(self.seed + epoch)
        torch.manual_seed(self.seed + epoch)

    def loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        x = self.to_input(x)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(self.device):
            return criterion(self.forward(x).float(), y.to(self.device))

    @torch.inference_mode()
    def validate(self) -> tuple[float, float]:
        """Mean loss and the metric (accuracy; F2 at 0.2 for multi-label) on the validation set."""
        self.model.eval()
        losses, outputs, targets = [], [], []
        for x, y in self.valid_loader:
            x, y = x.to(self.device), y.to(self.device)
            with autocast(self.device):
                logits = self.forward(x).float()
            losses.append(criterion(logits, y).item() * len(y))
            outputs.append(logits.cpu().numpy())
            targets.append(y.cpu().numpy())
        logits, labels = np.concatenate(outputs), np.concatenate(targets)
        metric = f2_score(probabilities(logits, True), labels, 0.2) if labels.ndim == 2 else accuracy(logits, labels)
        return float(np.sum(losses) / len(labels)), metric


def find_lr(model: Classifier, stage: StageConfig, data: StageData, ctx: Context, index: int) -> LrFindResult:
    """Run lr_find for a stage; writes lr_find_stage<N>.png and returns the sweep."""
    set_trainable(model, stage.trainable)
    data.seed_epoch(-1)
    result = lr_find(model, data.train_loader, data.loss, lambda: make_optimizer(stage, param_groups(model, stage.lr)),
                     ctx.recipe.lr_find, lambda: train_mode(model))
    plot_lr_find(result, ctx.run_dir / f"lr_find_stage{index}.png")
    shown = ", ".join(f"{k} {v:.2e}" for k, v in result.suggestions.items())
    ctx.log(f"lr_find (stage {stage.name!r}): {len(result.lrs)} steps; suggestions: {shown or 'none (diverged at once)'}")
    return result


def scaled_lrs(lrs: tuple[float, ...], peak: float) -> tuple[float, ...]:
    """Keep the ratios between layer groups, move the head's lr to peak."""
    return tuple(lr * peak / lrs[-1] for lr in lrs)


def _state_dict_bytes(model: nn.Module) -> bytes:
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buf)
    return buf.getvalue()


def commit_checkpoint(model: nn.Module, run_dir: Path, recipe: Recipe, classes: list[str], data_dir: Path,
                      figures: dict[str, Any]) -> Manifest:
    """Write model.pt, then the manifest naming it: the last step of the train stage."""
    checkpoint = run_dir / "model.pt"
    atomic_write_bytes(checkpoint, _state_dict_bytes(model))
    manifest = new_manifest(recipe, classes, data_dir)
    manifest = manifest.with_artifact(CHECKPOINT, run_dir, checkpoint, "train", library_versions(TRAIN_VERSIONS))
    manifest = manifest.with_stage("train", figures)
    RunDir(run_dir).write(manifest)
    return manifest


def save_state(run_dir: Path, state: dict[str, Any]) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(run_dir / STATE_FILE, buf.getvalue())  # a kill never leaves a torn file


def run_stage(model: Classifier, index: int, ctx: Context, state: dict[str, Any]) -> None:
    """Train stage `index` from state["epoch"] on, saving the state after each epoch."""
    stage = ctx.recipe.stages[index]
    if stage.schedule == "sgdr":
        sgdr_cycles(stage.epochs, stage.cycle_len, stage.cycle_mult)  # fail before training, not after
    data = StageData(model, stage, index, ctx)
    lrs = tuple(state["lrs"]) if state.get("lrs") else stage.lr
    if stage.lr_find and not state.get("lrs"):
        result = find_lr(model, stage, data, ctx, index)
        suggestion = result.suggestions.get(ctx.recipe.lr_find.suggestion)
        if suggestion:
            lrs = scaled_lrs(stage.lr, suggestion)
        state.setdefault("lr_finds", []).append({"stage": stage.name, **result.to_dict()})
    state["lrs"] = list(lrs)
    set_trainable(model, stage.trainable)
    optimizer = make_optimizer(stage, param_groups(model, lrs))
    if state.get("optimizer"):
        optimizer.load_state_dict(state.pop("optimizer"))
    steps = len(data.train_loader)
    for epoch in range(state["epoch"], stage.epochs):
        start, losses = time.perf_counter(), []
        data.seed_epoch(epoch)
        train_mode(model)
        # disable=None: a bar on a terminal, none in logs (epoch lines are printed either way).
        bar = tqdm(data.train_loader, desc=f"{stage.name} {epoch + 1}/{stage.epochs}", leave=False, dynamic_ncols=True, disable=None)
        for i, batch in enumerate(bar):
            scale = multiplier(stage.schedule, epoch * steps + i, steps, stage.epochs, stage.cycle_len, stage.cycle_mult, stage.warmup)
            for group in optimizer.param_groups:
                group["lr"] = group["peak_lr"] * scale
            loss = data.loss(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{np.mean(losses[-10:]):.3f}")
        valid_loss, acc = data.validate()
        row = EpochMetrics(stage.name, epoch + 1, optimizer.param_groups[-1]["lr"], float(np.mean(losses)), valid_loss, acc,
                           time.perf_counter() - start)
        state["rows"].append(asdict(row))
        ctx.log(f"{row.stage} epoch {row.epoch}/{stage.epochs}: train_loss {row.train_loss:.4f} "
                f"valid_loss {row.valid_loss:.4f} {metric_name(ctx.recipe)} {row.metric:.4f} ({row.seconds:.1f}s)")
        state.update(epoch=epoch + 1, model=model.state_dict(), optimizer=optimizer.state_dict())
        save_state(ctx.run_dir, state)
        state.pop("optimizer")
    state["stages_done"].append({"lrs": list(lrs), "steps": steps})


def metric_name(recipe: Recipe) -> str:
    return "f2" if recipe.multi_label else "accuracy"


def _metrics_csv(rows: list[dict], metric: str) -> bytes:
    """One row per epoch and stage; the metric column is named for what it holds."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow([metric if f == "metric" else f for f in METRIC_FIELDS])
    writer.writerows([row[f] for f in METRIC_FIELDS] for row in rows)
    return buf.getvalue().encode()


def plot_schedule(recipe: Recipe, steps_per_epoch: list[int], lrs: list[list[float]], path: Path) -> None:
    """The head's learning rate at every step of every stage, as it ran."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3))
    offset = 0
    for stage, steps, peaks in zip(recipe.stages, steps_per_epoch, lrs):
        values = np.asarray(schedule_values(stage.schedule, steps, stage.epochs, stage.cycle_len, stage.cycle_mult, stage.warmup))
        ax.plot(np.arange(offset, offset + len(values)), values * peaks[-1], label=stage.name)
        offset += len(values)
    ax.set_xlabel("step")
    ax.set_ylabel("lr (head)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _new_state(data_dir: Path) -> dict[str, Any]:
    return {"stage": 0, "epoch": 0, "rows": [], "lrs": None, "data_dir": str(data_dir.resolve()), "sessions": [],
            "stages_done": []}


def prepare_run(data_dir: Path, run_dir: Path, recipe: Recipe) -> dict[str, Any]:
    """A new run directory: the resolved recipe now, the manifest only when training is done."""
    if RunDir(run_dir).exists() or (run_dir / STATE_FILE).exists():
        raise ManifestError(f"{run_dir} already holds a run: expected a new run directory (or --resume {run_dir})")
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(run_dir / "recipe.resolved.toml", dump_recipe(recipe).encode())
    return _new_state(data_dir)


def load_state(run_dir: Path) -> tuple[Recipe, dict[str, Any]]:
    """What --resume continues from: the resolved recipe and the last epoch's state."""
    if RunDir(run_dir).exists():
        raise ManifestError(f"{run_dir} has finished training (manifest.json exists): nothing to resume")
    path = run_dir / STATE_FILE
    if not path.is_file():
        raise ManifestError(f"{run_dir} has no {STATE_FILE}: expected a run that was interrupted after its first epoch")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torn or foreign file
        raise ManifestError(f"{path}: unreadable training state ({exc})") from exc
    return load_recipe(run_dir / "recipe.resolved.toml"), state


def train_run(data_dir: Path | None, run_dir: Path, recipe: Recipe | None = None, log: Log = print, resume: bool = False) -> Manifest:
    """Train DATA/train (validate on DATA/valid) into RUN_DIR; the manifest is written last."""
    if resume:
        recipe, state = load_state(run_dir)
        data_dir = Path(state["data_dir"])
        log(f"resume: stage {state['stage'] + 1}/{len(recipe.stages)}, epoch {state['epoch']} done")
    else:
        if recipe is None or data_dir is None:
            raise RecipeError("train: expected --data and a recipe, or --resume RUN_DIR")
    train_split = scan_data(data_dir, "train", recipe.data.labels_csv)
    valid_split = scan_data(data_dir, "valid", recipe.data.labels_csv, classes=train_split.classes)
    device = pick_device(recipe.data.device)
    if not resume:  # only once the inputs are known to be good
        state = prepare_run(data_dir, run_dir, recipe)
    state["sessions"].append({"started": _now(), "stage": state["stage"], "epoch": state["epoch"]})
    ctx = Context(recipe, train_split, valid_split, device, run_dir, log)
    log(f"train: {len(train_split)} train / {len(valid_split)} valid images, classes {list(train_split.classes)}, "
        f"{recipe.model.arch} on {device}")
    seed_everything(recipe.seed)
    model = build_model(recipe.model, len(train_split.classes)).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    if state.get("model"):
        model.load_state_dict(state["model"])
    start = time.perf_counter()
    for index in range(state["stage"], len(recipe.stages)):
        run_stage(model, index, ctx, state)
        state.update(stage=index + 1, epoch=0, lrs=None)
    return finish_run(model, ctx, state, time.perf_counter() - start)


def finish_run(model: Classifier, ctx: Context, state: dict[str, Any], seconds: float) -> Manifest:
    recipe, run_dir, log = ctx.recipe, ctx.run_dir, ctx.log
    steps = [done["steps"] for done in state["stages_done"]]
    stage_lrs = [done["lrs"] for done in state["stages_done"]]
    final = recipe.stages[-1]
    spec = recipe.preprocess_spec()
    result = evaluate(model, ctx.valid, spec, recipe.data.batch_size, ctx.device, recipe.evaluate.tta,
                      final.augment if final.augment != "none" else "side_on", recipe.evaluate.n_aug, recipe.seed)
    log("evaluate: " + ", ".join(f"{k} {v:.4f}" for k, v in result.scores.items())
        + (f" (F2 at threshold {result.threshold})" if result.threshold is not None else ""))
    if recipe.evaluate.report and not recipe.multi_label:
        index = write_report(run_dir / "report", ctx.valid.files, np.asarray(ctx.valid.labels), result.probs,
                             ctx.valid.classes, recipe.evaluate.report_images)
        log(f"report: {index}")
    plot_schedule(recipe, steps, stage_lrs, run_dir / "schedule.png")
    atomic_write_bytes(run_dir / "metrics.csv", _metrics_csv(state["rows"], metric_name(recipe)))
    last = state["rows"][-1]
    figures = {"valid_accuracy": result.scores["plain"], "accuracy": result.scores}
    if recipe.multi_label:
        figures = {"valid_f2": result.scores["plain"], "f2": result.scores, "threshold": result.threshold}
    manifest = commit_checkpoint(model, run_dir, recipe, list(ctx.train.classes), Path(state["data_dir"]), {
        **figures,
        "metric": metric_name(recipe),
        "valid_loss": last["valid_loss"],
        "epochs": len(state["rows"]),
        "seconds": round(seconds, 2),
        "device": str(ctx.device),
        "train_images": len(ctx.train),
        "valid_images": len(ctx.valid),
        "stage_lrs": stage_lrs,
        "sessions": state["sessions"],
        "lr_finds": [{k: v for k, v in f.items() if k in ("stage", "suggestions")} for f in state.get("lr_finds", [])],
    })
    (run_dir / STATE_FILE).unlink(missing_ok=True)  # optimizer state is large; model.pt is the artifact
    log(f"train: valid {metric_name(recipe)} {result.scores['plain']:.4f} after {len(state['rows'])} epochs ({seconds:.1f}s) -> {run_dir}")
    return manifest


def lr_find_for_run(run_dir: Path, stage_index: int, log: Log = print) -> LrFindResult:
    """``clfpipe lr-find``: sweep stage N's settings from the run's trained weights (weights restored)."""
    from clfpipe.inference import load_run_model

    run = RunDir(run_dir)
    manifest = run.read()
    recipe = manifest.recipe
    if not 0 <= stage_index < len(recipe.stages):
        raise RecipeError(f"--stage: expected 0..{len(recipe.stages) - 1}, got {stage_index}")
    data_dir = Path(manifest.data["data_dir"])
    train_split = scan_data(data_dir, "train", recipe.data.labels_csv, tuple(manifest.classes))
    valid_split = scan_data(data_dir, "valid", recipe.data.labels_csv, tuple(manifest.classes))
    ctx = Context(recipe, train_split, valid_split, pick_device(recipe.data.device), run_dir, log)
    model = load_run_model(run, manifest).to(ctx.device)
    stage = recipe.stages[stage_index]
    result = find_lr(model, stage, StageData(model, stage, stage_index, ctx), ctx, stage_index)
    atomic_write_bytes(run_dir / f"lr_find_stage{stage_index}.json", (json.dumps(result.to_dict(), indent=1) + "\n").encode())
    return result
