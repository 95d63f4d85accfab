"""Datasets for training: augmented train images, eval images through the preprocessing spec."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from clfpipe.dataset import Split
from clfpipe.errors import DataError
from clfpipe.preprocess import PreprocessSpec, load_image, normalize, resize_crop


def augmentation(kind: str) -> v2.Transform | None:
    """fastai's transforms on the resized image: side_on (flip, rotate, lighting) or top_down (dihedral)."""
    lighting = v2.ColorJitter(brightness=0.05, contrast=0.05)
    rotate = v2.RandomApply([v2.RandomRotation(10)], p=0.75)
    if kind == "side_on":
        return v2.Compose([rotate, lighting, v2.RandomHorizontalFlip()])
    if kind == "top_down":
        return v2.Compose([rotate, lighting, v2.RandomHorizontalFlip(), v2.RandomVerticalFlip(),
                           v2.RandomApply([v2.RandomRotation((90, 90))], p=0.5)])
    return None


class ImageDataset(Dataset):
    """Files -> normalised CHW float tensors. With augmentation: random zoom crop + the transforms."""

    def __init__(self, split: Split, spec: PreprocessSpec, augment: str = "none", max_zoom: float = 1.1) -> None:
        self.split = split
        self.spec = spec
        self.transform = augmentation(augment)
        self.max_zoom = max_zoom

    def __len__(self) -> int:
        return len(self.split)

    def _pixels(self, index: int) -> np.ndarray:
        path = self.split.files[index]
        try:
            img = load_image(path)
        except ValueError as exc:
            raise DataError(f"corrupt image file {exc}") from exc
        if self.transform is None:
            return resize_crop(img, self.spec)
        # Random zoom: resize the shorter side up to max_zoom x, then a random crop.
        zoom = float(torch.empty(1).uniform_(1.0, self.max_zoom))
        side = max(self.spec.crop, round(self.spec.resize * zoom))
        img = v2.Resize(side)(img)
        img = v2.RandomCrop(self.spec.crop)(img)
        return np.asarray(self.transform(img), dtype=np.uint8)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int | torch.Tensor]:
        label = self.split.labels[index]
        if isinstance(label, tuple):  # multi-hot, for BCE
            label = torch.tensor(label, dtype=torch.float32)
        return torch.from_numpy(normalize(self._pixels(index), self.spec)), label


def make_loader(dataset: ImageDataset, batch_size: int, shuffle: bool, num_workers: int, seed: int) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        generator=generator,
        drop_last=shuffle and len(dataset) > batch_size,  # BatchNorm1d needs batches > 1
        persistent_workers=num_workers > 0,
    )
