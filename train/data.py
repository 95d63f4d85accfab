"""Training and evaluation batches: image files through the transforms factory (``clfpipe.nn.transforms``).

Two paths with one definition of the pixels: Pillow in the loader workers (``ImageDataset``), or
encoded bytes from the workers decoded and augmented as tensors on the training device
(``EncodedDataset``, then ``DecodedCache`` and ``augment_decoded``: nvJPEG on CUDA, the same code on
the CPU in the tests).
"""

from __future__ import annotations

import contextlib
import queue
import threading
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from clfpipe.contract.augment import AUGMENTS, AugmentPolicy
from clfpipe.contract.dataset import SPLITS, Split, scan_data
from clfpipe.contract.errors import DataError
from clfpipe.contract.manifest import Manifest, RunDir
from clfpipe.contract.preprocess import PreprocessSpec, load_image, normalize
from clfpipe.nn.transforms import decode_batch, normalize_batch, to_device, torch_draws, train_pixels, train_pixels_batch


def run_splits(run: RunDir, manifest: Manifest, data_dir: Path | None = None) -> tuple[Split, Split]:
    """A trained run's train and valid splits, from ``data_dir`` (default: the folder training
    read), which must hold the run's classes: one DataError saying which folder was read."""
    data = run.data_dir(manifest, data_dir)
    try:
        train, valid = (scan_data(data, split, manifest.recipe.data.labels_csv, tuple(manifest.classes)) for split in SPLITS)
    except DataError as exc:
        hint = "--data: expected the run's classes" if data_dir else "the folder training read; pass --data"
        raise DataError(f"{exc} ({hint})") from exc
    return train, valid


def _target(label: int | tuple[int, ...]) -> int | torch.Tensor:
    """A class index, or a multi-hot float vector for BCE (multi-label)."""
    return torch.tensor(label, dtype=torch.float32) if isinstance(label, tuple) else label


class ImageDataset(Dataset):
    """Files -> normalised CHW float tensors; augmented with the named policy, drawn from the global
    torch generator (which DataLoader seeds per worker from the loader's generator)."""

    def __init__(self, split: Split, spec: PreprocessSpec, augment: str = "none") -> None:
        self.split, self.spec, self.policy = split, spec, AUGMENTS[augment]

    def __len__(self) -> int:
        return len(self.split)

    def pixels(self, index: int) -> np.ndarray:
        path = self.split.files[index]
        try:
            img = load_image(path)
        except ValueError as exc:
            raise DataError(f"corrupt image file {exc}") from exc
        return np.asarray(train_pixels(img, self.policy, self.spec, torch_draws()), dtype=np.uint8)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int | torch.Tensor]:
        return torch.from_numpy(normalize(self.pixels(index), self.spec)), _target(self.split.labels[index])


def make_loader(dataset: Dataset, batch_size: int, *, shuffle: bool, num_workers: int, seed: int,
                sampler: Sampler | None = None) -> DataLoader:
    """`sampler` (a DistributedSampler: this rank's shard) replaces shuffling when given."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed),
        drop_last=shuffle and len(dataset) > batch_size,  # BatchNorm1d needs batches > 1
        persistent_workers=num_workers > 0,
    )


class EncodedDataset(Dataset):
    """(encoded bytes as a uint8 tensor, label, index): the loader workers only read files."""

    def __init__(self, split: Split) -> None:
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int | torch.Tensor, int]:
        # A plain CPU tensor over the bytes: torchvision's read_file tensors cannot cross the
        # worker processes' shared-memory queue (EBADF when pickled).
        data = Path(self.split.files[index]).read_bytes()
        return torch.frombuffer(bytearray(data), dtype=torch.uint8), _target(self.split.labels[index]), index


class EncodedBatch(NamedTuple):
    """A batch of encoded files as one flat uint8 tensor and their lengths: one shared-memory
    segment crosses from a loader worker (``_Crossing``), where a list crossed as one per file (125
    ms a batch of 256 on an H200 machine, 14 workers)."""

    flat: torch.Tensor
    lengths: torch.Tensor
    indices: torch.Tensor  # each file's index in its split

    def images(self) -> list[torch.Tensor]:
        return list(torch.split(self.flat, self.lengths.tolist()))


class _Crossing(tuple):
    """A worker's (EncodedBatch, labels) with the bytes as the one shared-memory segment of the
    batch and the small tensors pickled by value (unpickled as a plain tuple). Each segment is a
    file descriptor the consumer fetches from the worker over a new authenticated connection
    (multiprocessing's resource sharer), and the consumer is the decoding thread: a batch of 256
    ready in the queue took it 5.3 and 4.3 ms as four segments, 4.4 and 3.5 as one (two runs,
    medians of 8, 2 workers, the 2-core development CPU)."""

    def __reduce__(self) -> tuple[Callable[..., tuple[EncodedBatch, torch.Tensor]], tuple[Any, ...]]:
        encoded, labels = self
        return _crossed, (encoded.flat, encoded.lengths.numpy(), encoded.indices.numpy(), labels.numpy())


def _crossed(flat: torch.Tensor, lengths: np.ndarray, indices: np.ndarray, labels: np.ndarray) -> tuple[EncodedBatch, torch.Tensor]:
    return EncodedBatch(flat, torch.from_numpy(lengths), torch.from_numpy(indices)), torch.from_numpy(labels)


def _collate(batch: list[tuple[torch.Tensor, int | torch.Tensor, int]]) -> tuple[EncodedBatch, torch.Tensor]:
    data, labels, indices = zip(*batch)
    encoded = EncodedBatch(torch.cat(data), torch.tensor([len(d) for d in data]), torch.tensor(indices))
    return _Crossing((encoded, torch.stack(labels) if isinstance(labels[0], torch.Tensor) else torch.tensor(labels)))


def stop_workers(loader: Any) -> None:
    """Stop a loader's persistent workers now. Left to the garbage collector (a persistent loader
    and its iterator refer to each other), the iterator's queues were finalised before its shutdown
    could tell the workers to exit: 5 s per worker, 40 s of a 155 s run."""
    iterator = getattr(loader, "_iterator", None)  # DataLoader has no public close
    if iterator is not None:
        iterator._shutdown_workers()
        loader._iterator = None


def encoded_loader(split: Split, batch_size: int, num_workers: int, seed: int, sampler: Sampler | None = None,
                   start_method: str | None = None) -> DataLoader:
    """`start_method`: how the workers start (None: this interpreter's default)."""
    # not pinned: the decoder reads the bytes on the host, and pinning costs more than it saves
    return DataLoader(EncodedDataset(split), batch_size=batch_size, shuffle=sampler is None, sampler=sampler,
                      num_workers=num_workers, collate_fn=_collate, generator=torch.Generator().manual_seed(seed),
                      drop_last=len(split) > batch_size, persistent_workers=num_workers > 0,
                      multiprocessing_context=start_method if num_workers > 0 else None)


class TensorBatches:
    """Batches of tensors already on the training device (the precomputed activations): one index
    per batch, where a DataLoader over a TensorDataset collates sample by sample (most of a cached
    head epoch's time on a GPU). Same order as DataLoader(shuffle=True, generator=...): it draws
    the loader's base seed, then the permutation, from the generator."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, *, shuffle: bool, drop_last: bool,
                 generator: torch.Generator | None = None, sampler: Sampler | None = None) -> None:
        self.x, self.y, self.batch_size, self.shuffle, self.drop_last = x, y, batch_size, shuffle, drop_last
        self.generator, self.sampler = generator, sampler

    def _order(self) -> torch.Tensor:
        if self.sampler is not None:
            return torch.tensor(list(self.sampler), dtype=torch.long)
        if not self.shuffle:
            return torch.arange(len(self.x))
        torch.empty((), dtype=torch.int64).random_(generator=self.generator)  # DataLoader's base seed
        return torch.randperm(len(self.x), generator=self.generator)

    def __len__(self) -> int:
        n = len(self.sampler) if self.sampler is not None else len(self.x)  # type: ignore[arg-type]
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self._order().to(self.x.device)
        for i in range(len(self)):
            index = order[i * self.batch_size : (i + 1) * self.batch_size]
            yield self.x[index], self.y[index]


_DONE = object()  # the end of the loader, on the prefetch queues
_STOPPED = object()  # what a stage's get returns once the consumer has stopped

Step = Callable[[Any], Any]  # one part of making a loader's x ready on the device


class DeviceBatches:
    """A loader's batches made ready on the training device by ``steps`` applied in order (decode,
    then augment; or a copy), labels copied alongside. With ``ahead`` > 0 (the default on CUDA) a
    background thread on its own CUDA stream runs them in turn, up to ``ahead`` batches in advance,
    so the input's host work (nvJPEG's, the augmentation's launches) overlaps the step's; with
    ``thread_per_step`` each step has a thread and a stream of its own. One thread is the default:
    on an H200 (resnet34 224, batch 256, three runs) a thread per step ran 4,421, 3,497 and 4,637
    img/s, one thread doing both in turn 4,638, 4,071 and 5,131, against 8,973, 8,515 and 8,791 on a
    batch already on the GPU. The GPU is not what the parts share: in the second run their GPU time was
    decode 1.9 ms a batch, augmentation 8.9, step 28.7 (39.5 of the 73.2 ms a batch took), so
    something on the host serialises them; and without the decode (its result made beforehand) a
    batch took 26 ms less, more than the 18.6 ms the decode takes alone. The benchmark's
    ``step_beside_decode_img_s`` asks whether the decode blocks the steps outright; ``DecodedCache``
    takes the decode out of every epoch after the first. Same batches in the
    same order as ``ahead=0`` (inline, one by one): each step runs in one thread, and only the
    augmenting one draws from the augmentation generator."""

    def __init__(self, loader: Iterable, steps: Step | Sequence[Step], device: torch.device,
                 ahead: int | None = None, thread_per_step: bool = False) -> None:
        self.loader, self.device, self.thread_per_step = loader, device, thread_per_step
        self.steps: tuple[Step, ...] = tuple(steps) if isinstance(steps, Sequence) else (steps,)
        self.ahead = (2 if device.type == "cuda" else 0) if ahead is None else ahead

    @property
    def threads(self) -> int:
        """Prefetch threads a pass runs: none inline, else one, or one a step."""
        return len(self._stages()) if self.ahead > 0 else 0

    def _stages(self) -> tuple[Step, ...]:
        """What each prefetch thread does to a batch, in order."""
        return self.steps if self.thread_per_step else (self.prepare,)

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    def prepare(self, x: Any) -> Any:
        """A loader's x through every step in turn: the model's input on the device."""
        for step in self.steps:
            x = step(x)
        return x

    def _inline(self, batch: tuple[Any, torch.Tensor]) -> tuple[Any, torch.Tensor]:
        x, y = batch
        return self.prepare(x), to_device(y, self.device)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.ahead <= 0:
            yield from map(self._inline, self.loader)
            return
        stop, stages = threading.Event(), self._stages()
        queues = [queue.Queue(maxsize=self.ahead) for _ in stages]
        sources: list[Callable[[], Any]] = [partial(_get, q, stop) for q in queues[:-1]]
        threads = [threading.Thread(target=self._run_step, args=(stage, i == 0, source, queues[i], stop),
                                    name="clfpipe-prefetch", daemon=True)
                   for i, (stage, source) in enumerate(zip(stages, [self._loader_items(stop), *sources]))]
        for thread in threads:
            thread.start()
        try:
            while (item := _get(queues[-1], stop)) is not _DONE:
                if isinstance(item, BaseException):
                    raise item
                yield _hand_over(*item, self.device)
        finally:  # also when the consumer stops early (lr_find): the threads end, nothing is left running
            stop.set()
            for thread in threads:
                thread.join()

    def _loader_items(self, stop: threading.Event) -> Callable[[], Any]:
        """The first step's source: the loader's batches (not yet on the device), then _DONE."""
        batches = iter(self.loader)
        return lambda: next(batches, _DONE) if not stop.is_set() else _STOPPED

    def _run_step(self, stage: Step, first: bool, source: Callable[[], Any], out: queue.Queue, stop: threading.Event) -> None:
        """``stage`` on each item from ``source`` (the loader's batches where ``first``, else the
        thread before's) until _DONE, an error (passed on) or a stop."""
        cuda = self.device.type == "cuda"
        stream = torch.cuda.Stream(self.device) if cuda else None
        try:
            while (item := source()) is not _STOPPED:
                if item is _DONE or isinstance(item, BaseException):
                    _put(out, item, stop)
                    return
                with torch.cuda.stream(stream) if cuda else contextlib.nullcontext():
                    if first:
                        x, y = item[0], to_device(item[1], self.device)
                    else:
                        x, y = _hand_over(*item, self.device)  # made on the thread before's stream
                    batch = stage(x), y
                    done = stream.record_event() if cuda else None
                if not _put(out, (batch, done), stop):
                    return
        except BaseException as exc:  # noqa: BLE001 - raised again in the consumer's thread
            _put(out, exc, stop)


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    """The tensors in a batch: a tensor, or lists and tuples of them (decoded images)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


def _hand_over(batch: tuple[Any, torch.Tensor], done: torch.cuda.Event | None, device: torch.device) -> tuple[Any, torch.Tensor]:
    """The current stream waits for this batch only (made on another thread's stream); the
    allocator keeps its memory until the current stream's use of it is done."""
    if done is not None:
        current = torch.cuda.current_stream(device)
        current.wait_event(done)
        for tensor in _tensors(batch):
            tensor.record_stream(current)
    return batch


def _get(source: queue.Queue, stop: threading.Event) -> Any:
    """The next item, or _STOPPED once the consumer has stopped."""
    while not stop.is_set():
        with contextlib.suppress(queue.Empty):
            return source.get(timeout=0.05)
    return _STOPPED


def _put(ready: queue.Queue, item: Any, stop: threading.Event) -> bool:
    """Put unless the consumer has stopped: False then."""
    while not stop.is_set():
        with contextlib.suppress(queue.Full):
            ready.put(item, timeout=0.05)
            return True
    return False


class DecodedCache:
    """Encoded batches -> uint8 CHW tensors decoded on the device (``decode_batch``: nvJPEG on CUDA),
    keeping what it decodes there by the file's index, up to ``budget`` bytes: a file is decoded
    once a run (its first epoch), not once an epoch, and every stage (whatever its size) reads the
    same pixels. On an H200 (resnet34 224, batch 256) the e2e
    steps ran 5,419 img/s with the decode's result made beforehand against 3,497 decoding each
    batch (``benchmarks/train_throughput.py``: e2e_no_decode_img_s). Used by one thread at a time
    (a stage's decode step)."""

    def __init__(self, device: torch.device, budget: int, files: Sequence[Path] | None = None) -> None:
        self.device, self.budget, self.used = device, budget, 0
        self.files = files  # the split the indices point into: a file that does not decode is named
        self.images: dict[int, torch.Tensor] = {}
        self.decoded = 0  # images decoded so far (the others were found here)

    def __call__(self, encoded: EncodedBatch) -> list[torch.Tensor]:
        keys = encoded.indices.tolist()
        found = [self.images.get(key) for key in keys]
        missing = [i for i, img in enumerate(found) if img is None]
        if missing:
            files = encoded.images()
            names = [self.files[keys[i]] for i in missing] if self.files is not None else None
            for i, img in zip(missing, decode_batch([files[i] for i in missing], self.device, names)):
                found[i] = img
                self._keep(keys[i], img)
            self.decoded += len(missing)
        return found  # type: ignore[return-value]

    def _keep(self, key: int, img: torch.Tensor) -> None:
        if self.used + img.numel() <= self.budget:  # uint8: a byte an element
            self.images[key] = img
            self.used += img.numel()


def augment_decoded(images: list[torch.Tensor], spec: PreprocessSpec, *, policy: AugmentPolicy,
                    generator: torch.Generator, channels_last: bool = False, resample: torch.dtype | None = None) -> torch.Tensor:
    """Decoded images -> normalised float32 NCHW: each image's drawn augmentation (or the evaluation
    pixels), in the model's layout (``in_layout``) from the crops on: no pass to change it after.
    `resample`: the crops' products' dtype (``crop_batch``; None: the device's)."""
    return normalize_batch(train_pixels_batch(images, policy, spec, generator, resample, _LAYOUTS[channels_last]), spec)


@dataclass(frozen=True, eq=False)
class Augment:
    """A stage's augmentation step: decoded images -> the model's input (``augment_decoded``), made
    in channels_last where the model is (CUDA); `resample`: the crops' products' dtype (None: the
    device's)."""

    spec: PreprocessSpec
    policy: AugmentPolicy
    generator: torch.Generator
    channels_last: bool
    resample: torch.dtype | None = None

    def __call__(self, images: list[torch.Tensor]) -> torch.Tensor:
        return augment_decoded(images, self.spec, policy=self.policy, generator=self.generator,
                               channels_last=self.channels_last, resample=self.resample)


_LAYOUTS = {True: torch.channels_last, False: torch.contiguous_format}


def in_layout(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """A batch in the model's memory layout: channels_last where the model is (CUDA); as it is
    when it already has it."""
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x
