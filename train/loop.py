"""The training stage: run the recipe's stages, evaluate, then commit checkpoint and manifest.

Every epoch ends with an atomic ``train_state.pt`` (``TrainState``: weights, optimizer, position
in the recipe; written by ``StateWriter`` while the next epoch trains), so ``clfpipe train --resume RUN_DIR`` continues a killed run with the same
schedule. Each epoch seeds its own shuffling and augmentation from (seed, stage, epoch), so a
resumed run draws the same batches as an uninterrupted one. The manifest is written last.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import datetime as _dt
import io
import json
import logging
import math
import random
import time
from dataclasses import fields
from pathlib import Path
from typing import Any, Callable, TypeVar

import numpy as np
import torch
from torch import nn

from clfpipe.contract.archs import LAYER_GROUPS
from clfpipe.contract.dataset import scan_data
from clfpipe.contract.errors import ClfpipeError, ManifestError, RecipeError
from clfpipe.contract.lock import holding_run, run_lock
from clfpipe.contract.manifest import (
    CHECKPOINT,
    CHECKPOINT_FILE,
    Manifest,
    RunDir,
    atomic_write_bytes,
    library_versions,
    new_manifest,
    stage_start,
)
from clfpipe.contract.metrics import metric_name
from clfpipe.contract.progress import progress
from clfpipe.contract.recipe import Recipe, StageConfig, dump_recipe, load_recipe
from clfpipe.nn.models import Classifier, build_model, load_checkpoint, set_trainable, train_mode
from clfpipe.train.data import run_splits
from clfpipe.train.distributed import Dist, broadcast, from_env, mean, peer_stopped, per_rank_batch, setup, teardown
from clfpipe.train.evaluate import evaluate
from clfpipe.train.lr_find import LrFindResult, lr_find, plot_lr_find
from clfpipe.train.overfit import CycleEnd, better, cycle_ends, improves
from clfpipe.train.report import LossPoint, loss_png, write_report
from clfpipe.train.schedule import stage_multipliers
from clfpipe.train.stage import Context, StageData, make_optimizer, param_groups, pick_device
from clfpipe.train.state import STATE_FILE, EpochMetrics, StageDone, StateWriter, TrainState, to_host, torch_bytes
from clfpipe.train.step import TrainStep, train_step

log = logging.getLogger(__name__)
T = TypeVar("T")
TRAIN_VERSIONS = ("torch", "torchvision", "numpy", "pillow")
RECIPE_FILE = "recipe.resolved.toml"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def find_lr(model: Classifier, index: int, data: StageData, ctx: Context) -> LrFindResult:
    """Run lr_find for stage `index`; writes lr_find_stage<N>.png and returns the sweep."""
    stage = ctx.recipe.stages[index]
    set_trainable(model, stage.trainable)
    data.seed_epoch(-1)
    result = lr_find(model, data.train_loader, data.local_loss, lambda: make_optimizer(stage, param_groups(model, stage.lr)),
                     config=ctx.recipe.lr_find, set_mode=lambda: train_mode(model))
    plot_lr_find(result, ctx.run_dir / f"lr_find_stage{index}.png")
    shown = ", ".join(f"{k} {v:.2e}" for k, v in result.suggestions.items())
    log.info("lr_find (stage %d %s): %d steps from %.1e to %.1e; suggestions: %s", index, stage.name, len(result.lrs),
             result.lrs[0] if result.lrs else 0, result.lrs[-1] if result.lrs else 0, shown or "none (diverged at once)")
    return result


def scaled_lrs(lrs: tuple[float, ...], peak: float) -> tuple[float, ...]:
    """Keep the ratios between layer groups, move the head's lr to peak."""
    return tuple(lr * peak / lrs[-1] for lr in lrs)


def _state_dict_bytes(model: nn.Module) -> bytes:
    return torch_bytes({k: v.detach().cpu() for k, v in model.state_dict().items()})


def commit_checkpoint(model: nn.Module, run_dir: Path, *, recipe: Recipe, classes: list[str], data_dir: Path,
                      figures: dict[str, Any]) -> Manifest:
    """Write model.pt, then the manifest naming it and the stage-start checkpoints: the last step of
    the train stage."""
    checkpoint = run_dir / CHECKPOINT_FILE
    atomic_write_bytes(checkpoint, _state_dict_bytes(model))
    manifest = new_manifest(recipe, classes, data_dir, run_dir)
    versions = library_versions(TRAIN_VERSIONS)
    manifest = manifest.with_artifact(CHECKPOINT, run_dir, checkpoint, stage="train", versions=versions)
    for index in range(1, len(recipe.stages)):
        name, file = stage_start(index)
        if (run_dir / file).is_file():
            manifest = manifest.with_artifact(name, run_dir, run_dir / file, stage="train", versions=versions)
    manifest = manifest.with_stage("train", figures)
    RunDir(run_dir).write(manifest)
    return manifest


def _choose_lrs(model: Classifier, index: int, data: StageData, ctx: Context, state: TrainState) -> tuple[float, ...]:
    """The stage's peak lrs: resumed, moved by lr_find's suggestion (rank 0 sweeps, every rank gets
    the result), or the recipe's."""
    if state.lrs:
        return tuple(state.lrs)
    stage = ctx.recipe.stages[index]
    lrs = stage.lr
    if stage.lr_find:
        result = broadcast(find_lr(model, index, data, ctx) if ctx.dist.main else None, ctx.dist)
        suggestion = result.suggestions.get(ctx.recipe.lr_find.suggestion)
        if suggestion:
            lrs = scaled_lrs(stage.lr, suggestion)
        state.lr_finds.append({"stage": stage.name, **result.to_dict()})
    return lrs


def _train_epoch(data: StageData, step: TrainStep, optimizer: torch.optim.Optimizer, multipliers: list[float], *,
                 epoch: int, what: str) -> list[float]:
    steps, losses = len(data.train_loader), []
    for i, batch in enumerate(progress(data.train_loader, what, total=steps, unit="batch")):
        for group in optimizer.param_groups:
            group["lr"] = group["peak_lr"] * multipliers[epoch * steps + i]
        losses.append(step(batch))  # no .item() per step: it would wait for the GPU and stall the next batch's input
    return torch.stack(losses).tolist() if losses else []


def _graphs(ctx: Context) -> bool:
    """Whether the stages' steps are replayed from CUDA graphs: model.cuda_graphs, where the run can
    (CUDA, one process: DDP's gradient exchange is not captured)."""
    return ctx.recipe.model.cuda_graphs and ctx.device.type == "cuda" and not ctx.dist.active


def run_stage(model: Classifier, index: int, ctx: Context, state: TrainState, writer: StateWriter) -> None:
    """Train stage `index` from state.epoch on, saving the state (through `writer`) after each epoch."""
    stage = ctx.recipe.stages[index]
    with contextlib.closing(StageData(model, stage, index, ctx)) as data:
        _train_stage(model, index, stage, data, ctx, state, writer)


def _train_stage(model: Classifier, index: int, stage: StageConfig, data: StageData, ctx: Context, state: TrainState,
                 writer: StateWriter) -> None:
    lrs = _choose_lrs(model, index, data, ctx, state)
    state.lrs = list(lrs)
    set_trainable(model, stage.trainable)
    data.wrap(ctx.recipe.distributed.sync_batchnorm)
    optimizer = make_optimizer(stage, param_groups(model, lrs))
    if state.optimizer:
        optimizer.load_state_dict(state.optimizer)
        state.optimizer = None
    multipliers = stage_multipliers(stage, len(data.train_loader))
    step = train_step(data.loss, optimizer, ctx.device, cuda_graphs=_graphs(ctx))
    ends = cycle_ends(stage)
    for epoch in range(state.epoch, state.epoch if state.ended else stage.epochs):
        start = time.perf_counter()
        data.seed_epoch(epoch)
        train_mode(model)
        losses = _train_epoch(data, step, optimizer, multipliers, epoch=epoch,
                              what=f"stage {index} {stage.name} epoch {epoch + 1}/{stage.epochs}")
        train_loss = mean(float(np.mean(losses)), ctx.dist)
        state.epoch = epoch + 1
        # rank 0 validates, records and saves; the next step's gradient exchange (or a cycle's end) waits for it
        row = _validate(data, index, stage, optimizer, train_loss, state.epoch, start, ctx) if ctx.dist.main else None
        if row is not None:
            state.rows.append(row)
        if state.epoch in ends:
            _cycle_end(model, index, stage, row, ctx, state)
        if ctx.dist.main:
            state.model, state.optimizer = model.state_dict(), optimizer.state_dict()
            writer.save(state)
            state.optimizer = None
        if state.ended:
            break
    kept = state.best["end"]["epoch"] if state.ended and state.best else None
    state.stages_done.append(StageDone(list(lrs), len(data.train_loader), epochs=state.epoch, kept=kept))


def _validate(data: StageData, index: int, stage: StageConfig, optimizer: torch.optim.Optimizer, train_loss: float,
              epoch: int, start: float, ctx: Context) -> EpochMetrics:
    """The row of metrics.csv of the epoch (counted from 1) that began at `start`, logged."""
    valid_loss, metric = data.validate()
    row = EpochMetrics(index, stage.name, epoch, {g["name"]: g["lr"] for g in optimizer.param_groups}, train_loss,
                       valid_loss, metric, time.perf_counter() - start)
    log.info("stage %d %s epoch %d/%d: train_loss %.4f valid_loss %.4f %s %.4f (%.1fs)", index, row.stage, row.epoch,
             stage.epochs, row.train_loss, row.valid_loss, metric_name(ctx.recipe.multi_label), row.metric, row.seconds)
    return row


def _cycle_end(model: Classifier, index: int, stage: StageConfig, row: EpochMetrics | None, ctx: Context,
               state: TrainState) -> None:
    """An ``until = "overfit"`` stage at a cycle's end: over-fitting ends the stage with the best
    cycle end's weights restored; else this end's weights are kept if it is the best yet. Rank 0
    measured the end; every rank decides alike on it and keeps its own copy of the weights, which
    DDP holds equal."""
    end = broadcast(CycleEnd(row.epoch, row.metric, row.valid_loss) if row is not None else None, ctx.dist)
    best = CycleEnd(**state.best["end"]) if state.best else None
    metric = metric_name(ctx.recipe.multi_label)
    if not improves(end, best, state.lowest_loss):
        model.load_state_dict(state.best["model"])
        state.ended = True
        log.info("stage %d %s: over-fitting: epoch %d ends a cycle at %s %.4f, valid_loss %.4f, neither above the best "
                 "%s (epoch %d: %.4f) nor below the lowest loss (%.4f): epoch %d's weights restored, the stage ends after "
                 "%d of at most %d epochs", index, stage.name, end.epoch, metric, end.metric, end.valid_loss, metric,
                 best.epoch, best.metric, state.lowest_loss, best.epoch, end.epoch, stage.epochs)
        return
    if not better(end, best):  # the loss fell, or the first cycle end diverged
        why = "the loss still falls" if best else "not a number: no weights kept"
    elif end.epoch < stage.epochs:  # after the last cycle the stage ends with these weights anyway
        state.best, why = {"end": dataclasses.asdict(end), "model": to_host(model.state_dict())}, "the best yet"
    else:
        why = "the best yet"
    if math.isfinite(end.valid_loss):
        state.lowest_loss = min(state.lowest_loss, end.valid_loss)
    log.info("stage %d %s: epoch %d ends a cycle at %s %.4f, valid_loss %.4f: %s", index, stage.name, end.epoch, metric,
             end.metric, end.valid_loss, why)


def _metrics_csv(rows: list[EpochMetrics], metric: str) -> bytes:
    """One row per epoch and stage: each layer group's lr at the epoch's end (empty while frozen),
    and the metric column named for what it holds."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    names = [f.name for f in fields(EpochMetrics)]
    header: list[str] = []
    for f in names:
        header += [f"lr_{g}" for g in LAYER_GROUPS] if f == "lrs" else [metric if f == "metric" else f]
    writer.writerow(header)
    for row in rows:
        values: list[Any] = []
        for f in names:
            values += [row.lrs.get(g, "") for g in LAYER_GROUPS] if f == "lrs" else [getattr(row, f)]
        writer.writerow(values)
    return buf.getvalue().encode()


def plot_schedule(recipe: Recipe, done: list[StageDone], path: Path) -> None:
    """The head's learning rate at every step of every stage, as it ran."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3))
    offset = 0
    for stage, stage_done in zip(recipe.stages, done):
        ran = stage.epochs if stage_done.epochs is None else stage_done.epochs  # a stage stopped at over-fitting: what ran
        values = np.asarray(stage_multipliers(stage, stage_done.steps)[:ran * stage_done.steps])
        ax.plot(np.arange(offset, offset + len(values)), values * stage_done.lrs[-1], label=stage.name)
        offset += len(values)
    ax.set_xlabel("step")
    ax.set_ylabel("lr (head)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def prepare_run(data_dir: Path, run_dir: Path, recipe: Recipe, held: contextlib.ExitStack | None = None) -> TrainState:
    """A new run directory: the resolved recipe now, the manifest only when training is done. With
    `held`, the run's lock is taken into it, so that it lasts as long as the training."""
    _check_new(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ManifestError(f"cannot create the run directory {run_dir}: {exc.strerror or exc}") from exc
    if held is not None:
        held.enter_context(run_lock(run_dir, "train"))
        _check_new(run_dir)  # again, holding the lock: another may have finished in between
    atomic_write_bytes(run_dir / RECIPE_FILE, dump_recipe(recipe).encode())
    return TrainState(data_dir=str(Path(data_dir).resolve()))


def _check_new(run_dir: Path) -> None:
    if RunDir(run_dir).exists():  # --resume has nothing to continue there
        raise ManifestError(f"{run_dir} already holds a finished run: expected a new run directory")
    if (run_dir / STATE_FILE).exists():
        raise ManifestError(f"{run_dir} already holds an unfinished run: expected a new run directory "
                            f"(or --resume {run_dir} to continue it)")


def load_state(run_dir: Path) -> tuple[Recipe, TrainState]:
    """What --resume continues from: the resolved recipe and the last epoch's state."""
    if RunDir(run_dir).exists():
        raise ManifestError(f"{run_dir} has finished training (manifest.json exists): nothing to resume")
    state = TrainState.load(run_dir)
    return load_recipe(run_dir / RECIPE_FILE), state


def _on_main(dist: Dist, work: Callable[[], T]) -> T:
    """`work` on rank 0 and its result (or its one-line error) on every rank."""
    outcome: tuple[str, Any] | None = None
    if dist.main:
        try:
            outcome = ("ok", work())
        except ClfpipeError as exc:
            outcome = ("error", exc)
    kind, value = broadcast(outcome, dist)  # type: ignore[misc]
    if kind == "error":
        raise value
    return value


def train_run(data_dir: Path | None, run_dir: Path, recipe: Recipe | None = None, resume: bool = False) -> Manifest:
    """Train DATA/train (validate on DATA/valid) into RUN_DIR; the manifest is written last.
    Under torchrun every rank calls this; rank 0 alone writes."""
    dist = from_env()
    try:
        return _train(dist, data_dir, Path(run_dir), recipe, resume)
    except RuntimeError as exc:
        if (stopped := peer_stopped(exc, dist)) is not None:
            raise stopped from exc
        raise
    finally:
        teardown(dist)


def _decoding(ctx: Context) -> str:
    """Where the training images are decoded, for the log."""
    if ctx.decodes_on_device:
        where = "by nvJPEG on the GPU" if ctx.device.type == "cuda" else f"as tensors on {ctx.device}"
        kept = ctx.decoded_cache_bytes / 2**30
        return (f"images decoded {where}" + (f", kept there between epochs up to {kept:.1f} GiB" if kept else "")
                + (", in the run's input process" if ctx.recipe.data.input_process else ""))
    workers = ctx.loader_workers(ctx.train, per_rank_batch(ctx.recipe.data.batch_size, ctx.dist))
    return f"images decoded by Pillow in {workers} loader workers" if workers else "images decoded by Pillow in this process"


def _train(dist: Dist, data_dir: Path | None, run_dir: Path, recipe: Recipe | None, resume: bool) -> Manifest:
    """Rank 0 holds the run's lock (``run_lock``) from before it reads or makes the run to the end."""
    with contextlib.ExitStack() as held:
        return _train_held(dist, data_dir, run_dir, recipe, resume, held)


def _train_held(dist: Dist, data_dir: Path | None, run_dir: Path, recipe: Recipe | None, resume: bool,
                held: contextlib.ExitStack) -> Manifest:
    if resume:
        if dist.main:
            held.enter_context(run_lock(run_dir, "train --resume"))
        recipe, state = load_state(run_dir)
        data_dir = Path(state.data_dir)
        log.info("resume: stage %d of 0..%d, %d epoch(s) of it done", state.stage, len(recipe.stages) - 1, state.epoch)
    elif recipe is None or data_dir is None:
        raise RecipeError("train: expected --data and a recipe, or --resume RUN_DIR")
    train_split = scan_data(data_dir, "train", recipe.data.labels_csv)
    valid_split = scan_data(data_dir, "valid", recipe.data.labels_csv, classes=train_split.classes)
    device = setup(dist, pick_device(recipe.data.device))
    if not resume:  # only once the inputs are known to be good
        state = _on_main(dist, lambda: prepare_run(data_dir, run_dir, recipe, held))
    state.sessions.append({"started": _now(), "stage": state.stage, "epoch": state.epoch, "ranks": dist.world})
    ctx = Context(recipe, train_split, valid_split, device, run_dir, dist)
    log.info("train: %d train / %d valid images, classes %s, %s on %s%s, %s", len(train_split), len(valid_split),
             list(train_split.classes), recipe.model.arch, device, f" x {dist.world} ranks" if dist.active else "",
             _decoding(ctx))
    if recipe.data.input_process and not ctx.decodes_on_device:
        log.warning("data.input_process has no effect here: it moves the device decode's input (data.decode = "
                    "\"tensor\", or \"auto\" with JPEGs on CUDA), and these images are decoded by Pillow in the loader workers")
    if recipe.model.cuda_graphs and not _graphs(ctx):
        log.warning("model.cuda_graphs has no effect here: it needs a CUDA device and one process (this run: %s%s)",
                    device, f" x {dist.world} ranks" if dist.active else "")
    seed_everything(recipe.seed)
    model = build_model(recipe.model, len(train_split.classes)).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    if state.model:
        model.load_state_dict(state.model)
    start = time.perf_counter()
    # the last epoch's state is on disk when the writer closes; the run's input process ends before the evaluation
    with contextlib.closing(StateWriter(run_dir)) as writer, contextlib.closing(ctx):
        for index in range(state.stage, len(recipe.stages)):
            if dist.main and index > 0 and state.epoch == 0:  # what `clfpipe lr-find --stage N` sweeps from
                atomic_write_bytes(run_dir / stage_start(index)[1], _state_dict_bytes(model))
            run_stage(model, index, ctx, state, writer)
            state.next_stage()
    return _on_main(dist, lambda: finish_run(model, ctx, state, time.perf_counter() - start))


def _kept(state: TrainState) -> set[tuple[int, int]]:
    """(stage index, epoch) of each stage that stopped at over-fitting: the epoch whose weights it kept."""
    return {(index, done.kept) for index, done in enumerate(state.stages_done) if done.kept is not None}


def _loss_points(state: TrainState) -> list[LossPoint]:
    kept = _kept(state)
    return [LossPoint(r.stage, r.epoch, r.train_loss, r.valid_loss, kept=(r.stage_index, r.epoch) in kept, metric=r.metric)
            for r in state.rows]


def _final_row(state: TrainState) -> EpochMetrics:
    """The row of the weights the run ends with: its last epoch's, or the one its last stage kept."""
    last, done = len(state.stages_done) - 1, state.stages_done[-1]
    return next((r for r in state.rows if (r.stage_index, r.epoch) == (last, done.kept)), state.rows[-1])


def _stopped(recipe: Recipe, done: list[StageDone]) -> list[dict[str, Any]]:
    """The manifest's record of the stages that stopped at over-fitting."""
    return [{"stage": stage.name, "epochs": d.epochs, "max_epochs": stage.epochs, "kept_epoch": d.kept}
            for stage, d in zip(recipe.stages, done) if d.kept is not None]


def finish_run(model: Classifier, ctx: Context, state: TrainState, seconds: float) -> Manifest:
    recipe, run_dir = ctx.recipe, ctx.run_dir
    final = recipe.stages[-1]
    result = evaluate(model, ctx.valid, spec=recipe.preprocess_spec(), batch_size=recipe.data.batch_size, device=ctx.device,
                      policies=recipe.evaluate.tta, augment=final.augment if final.augment != "none" else "side_on",
                      n_aug=recipe.evaluate.n_aug, seed=recipe.seed)
    log.info("evaluate: %s%s", ", ".join(f"{k} {v:.4f}" for k, v in result.scores.items()),
             f" (F2 at threshold {result.threshold})" if result.threshold is not None else "")
    if recipe.evaluate.report and not recipe.multi_label:
        index = write_report(run_dir / "report", files=ctx.valid.files, labels=np.asarray(ctx.valid.labels),
                             probs=result.probs, classes=ctx.valid.classes, k=recipe.evaluate.report_images,
                             losses=_loss_points(state),
                             next_step=f"clfpipe data clean --run {run_dir}")
        log.info("report: %s", index)
    elif recipe.evaluate.report:  # asked for, and not made: say so rather than leave the user looking for it
        log.info("report: none for a multi-label run (the data-cleaning report ranks one class per image); "
                 "metrics.csv and loss.png are written")
    plot_schedule(recipe, state.stages_done, run_dir / "schedule.png")
    metric = metric_name(recipe.multi_label)
    loss_png(_loss_points(state), run_dir / "loss.png", metric)
    atomic_write_bytes(run_dir / "metrics.csv", _metrics_csv(state.rows, metric))
    stopped = _stopped(recipe, state.stages_done)
    figures: dict[str, Any] = {"valid_accuracy": result.scores["plain"], "accuracy": result.scores}
    if recipe.multi_label:
        figures = {"valid_f2": result.scores["plain"], "f2": result.scores, "threshold": result.threshold}
    manifest = commit_checkpoint(model, run_dir, recipe=recipe, classes=list(ctx.train.classes), data_dir=Path(state.data_dir), figures={
        **figures,
        "metric": metric,
        "valid_loss": _final_row(state).valid_loss,
        "epochs": len(state.rows),
        "seconds": round(seconds, 2),
        "device": str(ctx.device),
        "train_images": len(ctx.train),
        "valid_images": len(ctx.valid),
        "stage_lrs": [done.lrs for done in state.stages_done],
        "stopped_at_overfitting": stopped,
        "sessions": state.sessions,
        "lr_finds": [{k: v for k, v in f.items() if k in ("stage", "suggestions")} for f in state.lr_finds],
    })
    (run_dir / STATE_FILE).unlink(missing_ok=True)  # optimizer state is large; model.pt is the artifact
    stops = "".join(f"; {s['stage']} stopped at over-fitting after {s['epochs']} of {s['max_epochs']} epochs, "
                    f"epoch {s['kept_epoch']}'s weights kept" for s in stopped)
    log.info("train: valid %s %.4f after %d epochs (%.1fs) -> %s%s", metric, result.scores["plain"], len(state.rows),
             seconds, run_dir, stops)
    return manifest


def init_run(data_dir: Path, run_dir: Path, recipe: Recipe) -> Path:
    """A run with the recipe's model at its initial (seeded or pretrained) weights and no training:
    for benchmarks and serving checks that need the real size but not a trained model."""
    train = scan_data(data_dir, "train", recipe.data.labels_csv)
    state = prepare_run(data_dir, run_dir, recipe)
    seed_everything(recipe.seed)
    model = build_model(recipe.model, len(train.classes))
    commit_checkpoint(model, run_dir, recipe=recipe, classes=list(train.classes), data_dir=Path(state.data_dir),
                      figures={"epochs": 0, "note": "initial weights, not trained"})
    log.info("init: %s at its initial weights -> %s", recipe.model.arch, run_dir)
    return run_dir


def stage_start_model(run: RunDir, manifest: Manifest, index: int) -> Classifier:
    """The weights stage `index` started from: the recipe's seeded (or pretrained) initial weights for
    stage 0, the checkpoint saved when the stage began for the others."""
    recipe, classes = manifest.recipe, len(manifest.classes)
    if index == 0:
        seed_everything(recipe.seed)
        return build_model(recipe.model, classes)
    name, _ = stage_start(index)
    if name not in manifest.data["artifacts"]:
        raise ManifestError(f"{run.path} has no checkpoint of the weights stage {index} started from (runs trained before "
                            "stage-start checkpoints existed): train it again to sweep that stage")
    model = build_model(dataclasses.replace(recipe.model, weights="none"), classes)
    return load_checkpoint(model, run.artifact_path(manifest, name))


@holding_run("lr-find")
def lr_find_for_run(run_dir: Path, stage_index: int, data_dir: Path | None = None) -> LrFindResult:
    """``clfpipe lr-find``: sweep stage N's settings from the weights that stage started from, on
    `data_dir` (default: the folder training read); the run's files are left as they were (apart
    from lr_find_stage<N>.png and .json)."""
    run = RunDir(run_dir)
    manifest = run.read()
    recipe = manifest.recipe
    if not 0 <= stage_index < len(recipe.stages):
        n = len(recipe.stages)
        raise RecipeError(f"--stage: expected one of the run's stages, {'0' if n == 1 else f'0 to {n - 1}'} "
                          f"({', '.join(f'{i} {s.name}' for i, s in enumerate(recipe.stages))}), got {stage_index}")
    train_split, valid_split = run_splits(run, manifest, data_dir)
    ctx = Context(recipe, train_split, valid_split, pick_device(recipe.data.device), Path(run_dir))
    model = stage_start_model(run, manifest, stage_index).to(ctx.device)
    stage = recipe.stages[stage_index]
    with contextlib.closing(ctx), contextlib.closing(StageData(model, stage, stage_index, ctx)) as data:
        result = find_lr(model, stage_index, data, ctx)
    atomic_write_bytes(Path(run_dir) / f"lr_find_stage{stage_index}.json", (json.dumps(result.to_dict(), indent=1) + "\n").encode())
    return result
