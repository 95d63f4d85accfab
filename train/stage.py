"""One stage of the recipe: its batches, forward pass, loss and optimizer, and its validation."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence, Sized
from dataclasses import dataclass
from functools import cached_property, partial
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DistributedSampler

from clfpipe.contract.archs import LAYER_GROUPS
from clfpipe.contract.augment import AUGMENTS
from clfpipe.contract.dataset import Split
from clfpipe.contract.errors import RecipeError
from clfpipe.contract.metrics import score
from clfpipe.contract.preprocess import mostly_jpeg
from clfpipe.contract.probabilities import activate, activation_for
from clfpipe.contract.recipe import Recipe, StageConfig
from clfpipe.nn.models import Classifier
from clfpipe.train.data import (
    Augment,
    DecodedCache,
    DeviceBatches,
    ImageDataset,
    Step,
    TensorBatches,
    encoded_loader,
    in_layout,
    make_loader,
    stop_workers,
)
from clfpipe.train.distributed import SINGLE, Dist, per_rank_batch, wrap
from clfpipe.train.input_process import EpochSeeds, InputPlan, InputProcess, ProcessBatches, apply_seeds
from clfpipe.train.precompute import FeatureCache, cached_features, default_cache_dir

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Context:
    """What every stage needs: the run's fixed inputs."""

    recipe: Recipe
    train: Split
    valid: Split
    device: torch.device
    run_dir: Path
    dist: Dist = SINGLE

    @cached_property
    def decodes_on_device(self) -> bool:
        """Whether the image stages decode the training images on the device: decided once a run
        (``on_device_decode`` reads the first bytes of a sample of the files)."""
        return on_device_decode(self.recipe.data.decode, self.device, self.train.files)

    def loader_workers(self, split: Split, batch_size: int) -> int:
        """A loader's workers over ``split`` in batches of ``batch_size``: data.num_workers, where
        "auto" is no more than its batches an epoch."""
        return self.recipe.data.workers(batches=-(-len(split) // batch_size))

    @cached_property
    def decoded_cache_bytes(self) -> int:
        """What the decoded-image cache may keep: decided once a run, from the device's free memory."""
        free = torch.cuda.mem_get_info(self.device)[0] if self.device.type == "cuda" else None
        return self.recipe.data.decoded_cache_bytes(free)

    @cached_property
    def decoded(self) -> DecodedCache:
        """The device decode step, keeping decoded training images for every later epoch and stage."""
        return DecodedCache(self.device, self.decoded_cache_bytes, self.train.files)

    @cached_property
    def input_process(self) -> InputProcess:
        """The run's training input in a process of its own (``data.input_process``): one child for
        every image stage, its decoded images kept across them as ``decoded`` keeps them here."""
        return InputProcess(self.device, self.decoded_cache_bytes)

    def close(self) -> None:
        """End what the run started beside its stages: the input process, where one was made."""
        process = self.__dict__.get("input_process")  # cached_property's slot: not made by asking
        if process is not None:
            process.close()


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RecipeError("data.device: expected a CUDA device, got none (torch.cuda.is_available() is False)")
    return torch.device(name)


def autocast(device: torch.device, amp: str = "auto") -> contextlib.AbstractContextManager:
    """bf16 autocast by model.amp: on CUDA where supported (auto, bf16), on the CPU only when asked (bf16)."""
    if amp == "off":
        return contextlib.nullcontext()
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if device.type == "cpu" and amp == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def criterion(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy for class indices; BCE for multi-hot targets (multi-label)."""
    if y.dim() == 2:
        return nn.functional.binary_cross_entropy_with_logits(logits, y.float())
    return nn.functional.cross_entropy(logits, y)


def on_device_decode(decode: str, device: torch.device, files: Sequence[str | Path]) -> bool:
    """Whether training images are decoded on the device: "tensor" always, "pil" never, "auto" on
    CUDA for JPEGs (nvJPEG takes JPEGs only: other formats there would be decoded one by one on the
    host in one thread, where the loader workers decode them in parallel)."""
    return decode == "tensor" or (decode == "auto" and device.type == "cuda" and mostly_jpeg(files))


def param_groups(model: Classifier, lrs: tuple[float, ...] | list[float]) -> list[dict]:
    """One optimizer group per layer group with trainable parameters; one lr or one per group."""
    per_group = tuple(lrs) * len(LAYER_GROUPS) if len(lrs) == 1 else tuple(lrs)
    groups = []
    for name, group, lr in zip(LAYER_GROUPS, model.layer_groups(), per_group):
        params = [p for p in group.parameters() if p.requires_grad]
        if params:
            groups.append({"params": params, "lr": lr, "peak_lr": lr, "name": name})
    return groups


# fused: one kernel over every parameter (AdamW 13 ms a step for resnet34 on the 2-core CPU, against
# 48 ms for the default per-tensor loop and 64 ms for foreach; CPU and CUDA since torch 2.4)
OPTIMIZERS = {
    "sgd": lambda stage, groups: torch.optim.SGD(groups, momentum=stage.momentum, weight_decay=stage.weight_decay, fused=True),
    "adamw": lambda stage, groups: torch.optim.AdamW(groups, weight_decay=stage.weight_decay, fused=True),
}


def make_optimizer(stage: StageConfig, groups: list[dict]) -> torch.optim.Optimizer:
    return OPTIMIZERS[stage.optimizer](stage, groups)


class StageData:
    """Batches and forward pass of one stage: images through the model, or cached activations
    through the head only (precompute). Under several ranks, each rank's loader draws its shard
    (a DistributedSampler reshuffled every epoch) of batch_size / ranks images, and the training
    forward is wrapped in DDP; validation runs on rank 0 through the unwrapped module."""

    def __init__(self, model: Classifier, stage: StageConfig, index: int, ctx: Context) -> None:
        recipe, dist = ctx.recipe, ctx.dist
        self.model, self.device, self.dist, self.amp = model, ctx.device, dist, recipe.model.amp
        self.seed = recipe.seed * 1000 + index * 100
        self.spec, self.policy, self.augment_gen = recipe.preprocess_spec(index), AUGMENTS[stage.augment], torch.Generator()
        self.tensor_decode = not stage.precompute and ctx.decodes_on_device
        self.channels_last = ctx.device.type == "cuda" and not stage.precompute
        self.batch_size = per_rank_batch(recipe.data.batch_size, dist)
        if stage.precompute:
            self._precomputed(stage, recipe, ctx)
        else:
            self._images(stage, recipe, ctx)
        self.train_forward = self.forward  # DDP-wrapped by run_stage once the stage's trainable set is known

    def _sampler(self, dataset: Sized) -> DistributedSampler | None:
        """This rank's shard (DistributedSampler only needs the length)."""
        if not self.dist.active:
            return None
        return DistributedSampler(dataset, num_replicas=self.dist.world, rank=self.dist.rank, shuffle=True, seed=0,
                                  drop_last=True)

    def _images(self, stage: StageConfig, recipe: Recipe, ctx: Context) -> None:
        self.sampler = self._sampler(ctx.train)
        workers = ctx.loader_workers(ctx.train, self.batch_size)
        if self.tensor_decode and recipe.data.input_process:
            self._input_process(recipe, ctx, workers)
        else:
            self._input_threads(stage, recipe, ctx, workers)
        self.valid_loader = make_loader(ImageDataset(ctx.valid, self.spec), recipe.data.batch_size, shuffle=False,
                                        num_workers=ctx.loader_workers(ctx.valid, recipe.data.batch_size), seed=recipe.seed)
        self.forward = self.model

    def _input_threads(self, stage: StageConfig, recipe: Recipe, ctx: Context, workers: int) -> None:
        """Loader workers in processes, the input steps in this process (prefetch threads on CUDA)."""
        if self.tensor_decode:
            self.host_loader = encoded_loader(ctx.train, self.batch_size, workers, recipe.seed, sampler=self.sampler)
        else:
            self.host_loader = make_loader(ImageDataset(ctx.train, self.spec, stage.augment), self.batch_size, shuffle=True,
                                           num_workers=workers, seed=recipe.seed, sampler=self.sampler)
        self.train_loader = DeviceBatches(self.host_loader, self.input_steps(ctx), ctx.device)
        self.reseed = partial(apply_seeds, loader=self.host_loader.generator, augment=self.augment_gen, sampler=self.sampler)

    def _input_process(self, recipe: Recipe, ctx: Context, workers: int) -> None:
        """The same loader and input steps in the run's input process (``data.input_process``)."""
        plan = InputPlan(ctx.train, self.spec, self.policy, self.batch_size, workers, recipe.seed, self.channels_last,
                         self.sampler)
        self.train_loader = ctx.input_process.batches(plan)
        self.reseed = self.train_loader.seed

    def _precomputed(self, stage: StageConfig, recipe: Recipe, ctx: Context) -> None:
        if stage.augment != "none":
            log.warning("stage %r: augment=%r has no effect while precompute=true (the same activations are shown "
                        "every epoch)", stage.name, stage.augment)
        cache = FeatureCache(default_cache_dir(recipe.data.cache_dir))
        tensors = []
        for split in (ctx.train, ctx.valid):
            result = cached_features(self.model, split, self.spec, cache, batch_size=recipe.data.batch_size,
                                     device=ctx.device, dist=ctx.dist)
            log.info("precompute: %d images, cache %s (%s.npy)", len(split), result.status, cache.root / result.key)
            labels = torch.tensor(split.labels, dtype=torch.float32 if split.multi_label else torch.long)
            tensors.append((torch.from_numpy(result.features).to(ctx.device), labels.to(ctx.device)))
        generator = torch.Generator()
        self.sampler = self._sampler(tensors[0][0])
        bs, n = self.batch_size, len(tensors[0][0])
        self.train_loader = TensorBatches(*tensors[0], bs, shuffle=self.sampler is None, drop_last=n > bs,
                                          generator=generator, sampler=self.sampler)
        self.reseed = partial(apply_seeds, loader=generator, augment=self.augment_gen, sampler=self.sampler)
        self.valid_loader = TensorBatches(*tensors[1], recipe.data.batch_size, shuffle=False, drop_last=False)
        self.forward = self.model.head[2:]

    def close(self) -> None:
        """Stop the stage's loader workers (``stop_workers``), in this process or the input process, and
        let go of the DDP wrapper, now. The wrapper holds its gradient buckets and the process group;
        left to the garbage collector it can outlive the run (a reference cycle through a stack frame,
        such as the one matplotlib's tight_layout leaves under lr_find's plot, keeps the stage alive),
        and a gloo group destroyed during the interpreter's exit can abort the process ("terminate
        called without an active exception")."""
        for loader in (getattr(self, "host_loader", None), self.valid_loader):
            stop_workers(loader)
        if isinstance(self.train_loader, ProcessBatches):
            self.train_loader.close()
        self.train_forward = self.forward

    def wrap(self, sync_batchnorm: bool) -> None:
        """DDP around the stage's forward, now that what trains is set."""
        self.train_forward = wrap(self.forward, self.dist, self.device, sync_batchnorm)

    def input_steps(self, ctx: Context) -> tuple[Step, ...]:
        """What makes a loader's x the model's input on the device, in order: encoded bytes are
        decoded (or found decoded: ``Context.decoded``), then augmented there (two steps, run in
        turn by one prefetch thread on CUDA)."""
        if self.tensor_decode:
            return ctx.decoded, Augment(self.spec, self.policy, self.augment_gen, self.channels_last)
        return (self._copy,)

    def _copy(self, x: torch.Tensor) -> torch.Tensor:
        return in_layout(x.to(self.device, non_blocking=True), self.channels_last)

    def seed_epoch(self, epoch: int) -> None:
        """Shuffle order and augmentation depend on (seed, stage, epoch, rank) only: resumable. Every
        rank shuffles alike (the sampler deals out the shards); each augments its own images."""
        self.reseed(EpochSeeds(loader=self.seed + epoch, augment=self.seed + epoch + 7919 * self.dist.rank,
                               sampler_epoch=self.seed + epoch))
        torch.manual_seed(self.seed + epoch + 7919 * self.dist.rank)

    def loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """The training loss through the (DDP-wrapped) training forward."""
        return self._loss(batch, self.train_forward)

    def local_loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """The same through the unwrapped module: for what one rank does alone (lr_find)."""
        return self._loss(batch, self.forward)

    def _loss(self, batch: tuple[torch.Tensor, torch.Tensor], forward: nn.Module) -> torch.Tensor:
        """A batch from ``train_loader``: already on the device."""
        x, y = batch
        with autocast(self.device, self.amp):
            return criterion(forward(x).float(), y)

    @torch.inference_mode()
    def validate(self) -> tuple[float, float]:
        """Mean loss and the metric on the validation set (F2 at its best threshold for multi-label)."""
        self.model.eval()
        losses, outputs, targets = [], [], []
        for x, y in self.valid_loader:
            x, y = x.to(self.device), y.to(self.device)
            with autocast(self.device, self.amp):
                logits = self.forward(x).float()
            losses.append(criterion(logits, y).item() * len(y))
            outputs.append(logits.cpu().numpy())
            targets.append(y.cpu().numpy())
        logits, labels = np.concatenate(outputs), np.concatenate(targets)
        probs = activate(logits, activation_for(multi_label=labels.ndim == 2))
        return float(np.sum(losses) / len(labels)), score(probs, labels)
