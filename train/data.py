"""Training and evaluation batches: image files through the transforms factory (``clfpipe.nn.transforms``).

Two paths with one definition of the pixels: Pillow in the loader workers (``ImageDataset``), or
encoded bytes from the workers decoded and augmented as tensors on the training device
(``EncodedDataset`` + ``device_batch``: nvJPEG on CUDA, the same code on the CPU in the tests).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from clfpipe.contract.augment import AUGMENTS, AugmentPolicy
from clfpipe.contract.dataset import Split
from clfpipe.contract.errors import DataError
from clfpipe.contract.preprocess import PreprocessSpec, load_image, normalize
from clfpipe.nn.transforms import decode_batch, normalize_batch, torch_uniform, train_pixels


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


def _collate(batch: list[tuple[torch.Tensor, int | torch.Tensor]]) -> tuple[list[torch.Tensor], torch.Tensor]:
    labels = [b[1] for b in batch]
    return [b[0] for b in batch], torch.stack(labels) if isinstance(labels[0], torch.Tensor) else torch.tensor(labels)


def encoded_loader(split: Split, batch_size: int, num_workers: int, seed: int, sampler: Sampler | None = None) -> DataLoader:
    return DataLoader(EncodedDataset(split), batch_size=batch_size, shuffle=sampler is None, sampler=sampler,
                      num_workers=num_workers, collate_fn=_collate, generator=torch.Generator().manual_seed(seed),
                      drop_last=len(split) > batch_size, pin_memory=torch.cuda.is_available(),
                      persistent_workers=num_workers > 0)


def device_batch(encoded: list[torch.Tensor], device: torch.device, spec: PreprocessSpec, *, policy: AugmentPolicy,
                 generator: torch.Generator) -> torch.Tensor:
    """Encoded images -> normalised float32 NCHW on the device: decoded there, then each image's
    drawn augmentation (or the evaluation pixels)."""
    uniform = torch_uniform(generator)
    images = [train_pixels(img, policy, spec, uniform) for img in decode_batch(encoded, device)]
    return normalize_batch(torch.stack(images), spec)
