"""The fast.ai folder layout: DATA/train/<class>/*.jpg and DATA/valid/<class>/*.jpg."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from clfpipe.contract.errors import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


@dataclass(frozen=True)
class Split:
    """One split: files with their labels, and the class names in order.

    A label is a class index (single-label) or a multi-hot tuple over the classes (multi-label).
    """

    files: tuple[Path, ...]
    labels: tuple[Any, ...]
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.files)

    @property
    def multi_label(self) -> bool:
        return bool(self.labels) and isinstance(self.labels[0], tuple)


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def check_image(path: Path) -> None:
    """Header check: catches non-images and corrupt headers without a full decode."""
    try:
        with Image.open(path) as img:
            img.verify()
    except Exception as exc:  # PIL raises many types for corrupt files
        raise DataError(f"corrupt image file {path}: {exc}") from exc


# Folder names accepted for a split, first match wins (torchvision's ImageNet layout says val/)
SPLIT_FOLDERS = {"train": ("train",), "valid": ("valid", "val")}


def split_folder(data_dir: Path, split: str, layout: str) -> Path:
    """DATA/<split>, or its accepted alias; DataError naming what was expected otherwise."""
    if not Path(data_dir).is_dir():
        raise DataError(f"data folder not found: {data_dir}")
    names = SPLIT_FOLDERS.get(split, (split,))
    for name in names:
        if (Path(data_dir) / name).is_dir():
            return Path(data_dir) / name
    wanted = " or ".join(f"'{n}'" for n in names)
    raise DataError(f"expected a {wanted} folder in {data_dir} (layout {names[0]}/{layout}), got none")


def scan_split(data_dir: Path, split: str, classes: tuple[str, ...] | None = None, *, verify: bool = True) -> Split:
    """Read DATA/<split>/<class>/...; classes default to the sorted folder names."""
    root = split_folder(data_dir, split, "<class>/*.jpg")
    found = sorted(p.name for p in root.iterdir() if p.is_dir())
    if classes is None:
        classes = tuple(found)
        if len(classes) < 2:
            raise DataError(f"expected at least 2 class folders in {root}, got {len(classes)}")
    elif sorted(classes) != found:
        raise DataError(f"{root}: expected class folders {list(classes)}, got {found}")
    files: list[Path] = []
    labels: list[int] = []
    for index, name in enumerate(classes):
        images = list_images(root / name)
        if not images:
            raise DataError(f"class folder has no images: {root / name} (expected files ending in {', '.join(IMAGE_SUFFIXES)})")
        for path in images:
            if verify:
                check_image(path)
            files.append(path)
            labels.append(index)
    return Split(tuple(files), tuple(labels), tuple(classes))


def read_tags(csv_path: Path) -> dict[str, tuple[str, ...]]:
    """Planet-style labels: a CSV with columns image,tags (tags space-separated); keys are file stems."""
    if not csv_path.is_file():
        raise DataError(f"labels file not found: {csv_path} (expected a CSV with columns image,tags)")
    with open(csv_path, newline="") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None or not {"image", "tags"} <= set(reader.fieldnames):
            raise DataError(f"{csv_path}: expected columns image,tags, got {reader.fieldnames}")
        return {Path(row["image"]).stem: tuple(row["tags"].split()) for row in reader}


def scan_multilabel(data_dir: Path, split: str, labels_csv: str, classes: tuple[str, ...] | None = None, *,
                    verify: bool = True) -> Split:
    """DATA/<split>/*.jpg with tags from DATA/<labels_csv>; classes default to the sorted tags."""
    root = split_folder(data_dir, split, "*.jpg, tags in a CSV")
    tags = read_tags(Path(data_dir) / labels_csv)
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"no images in {root} (expected files ending in {', '.join(IMAGE_SUFFIXES)})")
    missing = [f.name for f in files if f.stem not in tags]
    if missing:
        raise DataError(f"{labels_csv} has no tags for {len(missing)} image(s) in {root}, e.g. {missing[0]}")
    if classes is None:
        classes = tuple(sorted({t for f in files for t in tags[f.stem]}))
    index = {c: i for i, c in enumerate(classes)}
    labels = []
    for path in files:
        if verify:
            check_image(path)
        unknown = [t for t in tags[path.stem] if t not in index]
        if unknown:
            raise DataError(f"{path.name}: tag {unknown[0]!r} not among the training tags {list(classes)}")
        labels.append(tuple(int(c in tags[path.stem]) for c in classes))
    return Split(tuple(files), tuple(labels), tuple(classes))


def scan_data(data_dir: Path, split: str, labels_csv: str = "", classes: tuple[str, ...] | None = None, *,
              verify: bool = True) -> Split:
    """Single-label class folders, or multi-label tags when labels_csv is set."""
    if labels_csv:
        return scan_multilabel(data_dir, split, labels_csv, classes, verify=verify)
    return scan_split(data_dir, split, classes, verify=verify)
