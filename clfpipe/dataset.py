"""The fast.ai folder layout: DATA/train/<class>/*.jpg and DATA/valid/<class>/*.jpg."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from clfpipe.errors import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


@dataclass(frozen=True)
class Split:
    """One split: files with their class indices, and the class names in order."""

    files: tuple[Path, ...]
    labels: tuple[int, ...]
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.files)


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def check_image(path: Path) -> None:
    """Header check: catches non-images and corrupt headers without a full decode."""
    try:
        with Image.open(path) as img:
            img.verify()
    except Exception as exc:  # PIL raises many types for corrupt files
        raise DataError(f"corrupt image file {path}: {exc}") from exc


def scan_split(data_dir: Path, split: str, classes: tuple[str, ...] | None = None, verify: bool = True) -> Split:
    """Read DATA/<split>/<class>/...; classes default to the sorted folder names."""
    root = Path(data_dir) / split
    if not Path(data_dir).is_dir():
        raise DataError(f"data folder not found: {data_dir}")
    if not root.is_dir():
        raise DataError(f"expected a '{split}' folder in {data_dir} (layout {split}/<class>/*.jpg), got none")
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
