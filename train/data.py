"""Training and evaluation batches: image files through the transforms factory (``clfpipe.nn.transforms``).

Two paths with one definition of the pixels: Pillow in the loader workers (``ImageDataset``), or
encoded bytes from the workers decoded and augmented as tensors on the training device
(``EncodedDataset`` + ``device_batch``: nvJPEG on CUDA, the same code on the CPU in the tests).
"""

from __future__ import annotations

import contextlib
import queue
import threading
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from clfpipe.contract.augment import AUGMENTS, AugmentPolicy
from clfpipe.contract.dataset import Split
from clfpipe.contract.errors import DataError
from clfpipe.contract.preprocess import PreprocessSpec, load_image, normalize
from clfpipe.nn.transforms import decode_batch, normalize_batch, to_device, torch_uniform, train_pixels, train_pixels_batch


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
        return np.asarray(train_pixels(img, self.policy, self.spec, torch_uniform()), dtype=np.uint8)

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
    """(encoded bytes as a uint8 tensor, label): the loader workers only read files."""

    def __init__(self, split: Split) -> None:
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int | torch.Tensor]:
        # A plain CPU tensor over the bytes: torchvision's read_file tensors cannot cross the
        # worker processes' shared-memory queue (EBADF when pickled).
        data = Path(self.split.files[index]).read_bytes()
        return torch.frombuffer(bytearray(data), dtype=torch.uint8), _target(self.split.labels[index])


class EncodedBatch(NamedTuple):
    """A batch of encoded files as one flat uint8 tensor and their lengths: two tensors cross from
    a loader worker, where a list crossed as one shared-memory segment per file (125 ms a batch of
    256 on an H200 machine, 14 workers)."""

    flat: torch.Tensor
    lengths: torch.Tensor

    def images(self) -> list[torch.Tensor]:
        return list(torch.split(self.flat, self.lengths.tolist()))


def _collate(batch: list[tuple[torch.Tensor, int | torch.Tensor]]) -> tuple[EncodedBatch, torch.Tensor]:
    labels = [b[1] for b in batch]
    data = [b[0] for b in batch]
    encoded = EncodedBatch(torch.cat(data), torch.tensor([len(d) for d in data]))
    return encoded, torch.stack(labels) if isinstance(labels[0], torch.Tensor) else torch.tensor(labels)


def encoded_loader(split: Split, batch_size: int, num_workers: int, seed: int, sampler: Sampler | None = None) -> DataLoader:
    # not pinned: the decoder reads the bytes on the host, and pinning costs more than it saves
    return DataLoader(EncodedDataset(split), batch_size=batch_size, shuffle=sampler is None, sampler=sampler,
                      num_workers=num_workers, collate_fn=_collate, generator=torch.Generator().manual_seed(seed),
                      drop_last=len(split) > batch_size, persistent_workers=num_workers > 0)


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


_DONE = object()  # the end of the loader, on the prefetch queue


class DeviceBatches:
    """A loader's batches made ready on the training device by ``prepare`` (decode and augment, or
    copy). With ``ahead`` > 0 (the default on CUDA) a background thread prepares up to ``ahead``
    batches in advance, on its own CUDA stream: nvJPEG's decode blocks its caller until the batch
    is decoded (24 ms a batch of 256 on an H100) and releases the GIL meanwhile, so the step's
    launches go on in the main thread and its kernels do not queue behind the input's. Same
    batches in the same order as ``ahead=0`` (inline, one by one): the thread alone draws from the
    loader and the augmentation generator."""

    def __init__(self, loader: Iterable, prepare: Callable[[Any], torch.Tensor], device: torch.device,
                 ahead: int | None = None) -> None:
        self.loader, self.prepare, self.device = loader, prepare, device
        self.ahead = (2 if device.type == "cuda" else 0) if ahead is None else ahead

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    def _ready(self, batch: tuple[Any, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = batch
        return self.prepare(x), to_device(y, self.device)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.ahead <= 0:
            yield from map(self._ready, self.loader)
            return
        ready: queue.Queue = queue.Queue(maxsize=self.ahead)
        stop = threading.Event()
        worker = threading.Thread(target=self._fill, args=(ready, stop), name="clfpipe-prefetch", daemon=True)
        worker.start()
        try:
            while (item := ready.get()) is not _DONE:
                if isinstance(item, BaseException):
                    raise item
                yield self._hand_over(*item)
        finally:  # also when the consumer stops early (lr_find): the thread ends, nothing is left running
            stop.set()
            while worker.is_alive():
                with contextlib.suppress(queue.Empty):
                    ready.get(timeout=0.05)
            worker.join()

    def _fill(self, ready: queue.Queue, stop: threading.Event) -> None:
        cuda = self.device.type == "cuda"
        stream = torch.cuda.Stream(self.device) if cuda else None
        try:
            for batch in self.loader:
                with torch.cuda.stream(stream) if cuda else contextlib.nullcontext():
                    prepared = self._ready(batch)
                    done = stream.record_event() if cuda else None
                if not _put(ready, (prepared, done), stop):
                    return
            _put(ready, _DONE, stop)
        except BaseException as exc:  # noqa: BLE001 - raised again in the consumer's thread
            _put(ready, exc, stop)

    def _hand_over(self, batch: tuple[torch.Tensor, torch.Tensor],
                   done: torch.cuda.Event | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's stream waits for this batch only; the allocator keeps its memory until the
        step's use of it is done."""
        if done is not None:
            main = torch.cuda.current_stream(self.device)
            main.wait_event(done)
            for tensor in batch:
                tensor.record_stream(main)
        return batch


def _put(ready: queue.Queue, item: Any, stop: threading.Event) -> bool:
    """Put unless the consumer has stopped: False then."""
    while not stop.is_set():
        with contextlib.suppress(queue.Full):
            ready.put(item, timeout=0.05)
            return True
    return False


def device_batch(encoded: EncodedBatch | list[torch.Tensor], device: torch.device, spec: PreprocessSpec, *,
                 policy: AugmentPolicy, generator: torch.Generator) -> torch.Tensor:
    """Encoded images -> normalised float32 NCHW on the device: decoded there, then each image's
    drawn augmentation (or the evaluation pixels)."""
    if isinstance(encoded, EncodedBatch):
        encoded = encoded.images()
    return normalize_batch(train_pixels_batch(decode_batch(encoded, device), policy, spec, torch_uniform(generator)), spec)
