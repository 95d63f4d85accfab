"""``clfpipe data split``: a folder of class folders (or of images with a table of their classes or
tags) into the train/ and valid/ layout every other command reads, holding out a fraction of each
class for validation, as fastai's ``valid_pct`` does (stratified here: every class keeps its share
in both splits). Files of a class with the same bytes go to one split together (with
``near_bits``, those that look alike too: ``similar``): a copy on each side would put a training
image in the validation score.

The source is never changed: files are hard-linked into the new folder (copied where the two lie
on different file systems), and the new folder appears whole or not at all.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence, TypeVar

import numpy as np

from clfpipe.contract.dataset import (
    MAX_CHECK_WORKERS,
    class_images,
    hidden,
    identical,
    image_files,
    listed_images,
    loose_images,
    read_classes,
    read_tags,
)
from clfpipe.contract.errors import DataError
from clfpipe.contract.similar import check_near_bits, file_hash, near_groups

log = logging.getLogger(__name__)

# link errors that mean "not here", not "broken": another file system, or one without hard links
_NO_LINK = {errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP}


@dataclass(frozen=True)
class HoldoutResult:
    train: int
    valid: int
    classes: int  # classes (single-label) or 0 (tagged images)
    copied: int  # files copied where a hard link could not be made
    outside: int  # images directly in the source, in no class folder: left out


def valid_count(n: int, pct: float) -> int:
    """Images of a class of `n` that go to valid: `pct` of them rounded, and at least one in each split."""
    return min(max(1, round(pct * n)), n - 1)


def check_pct(pct: float) -> None:
    if not 0 < pct < 1:  # nan fails this too
        raise DataError(f"--valid-pct: expected a fraction between 0 and 1 (0.2 holds out a fifth), got {pct}")


T = TypeVar("T")


def holdout(files: Sequence[T], pct: float, rng: np.random.Generator) -> tuple[list[T], list[T]]:
    """(train, valid): a random `valid_count` of `files` to valid, each list in the files' order."""
    chosen = set(rng.permutation(len(files))[: valid_count(len(files), pct)].tolist())
    return [f for i, f in enumerate(files) if i not in chosen], [f for i, f in enumerate(files) if i in chosen]


# What each group's files are placed as: (the file, its path under OUT/<split>)
Placed = list[tuple[Path, Path]]


def _units(placed: Placed, name: str, near_bits: int | None = None) -> list[Placed]:
    """A class's files as the units held out: each file, or the files with one content together
    (with ``near_bits``, near copies too)."""
    groups = identical([f for f, _ in placed])
    if near_bits is not None:
        groups = _near(groups, [placed[group[0]][0] for group in groups], near_bits)
    units = [[placed[i] for i in group] for group in groups]
    if len(units) < 2:
        what = "copies or near copies of one image" if near_bits is not None else "files of the same bytes"
        raise DataError(f"{f'class {name!r}' if name else 'the images'}: expected at least 2 different images to hold "
                        f"one out, got {len(placed)} {what}")
    return units


def _near(groups: list[list[int]], firsts: Sequence[Path], near_bits: int) -> list[list[int]]:
    """``groups`` (of files' indices; ``firsts``, a file of each) merged where their images look
    alike; a file that does not decode keeps its group. In the order of each group's first index."""
    with ThreadPoolExecutor(min(os.cpu_count() or 1, MAX_CHECK_WORKERS)) as pool:
        hashes = list(pool.map(file_hash, firsts))
    hashed = [g for g, h in enumerate(hashes) if h is not None]
    merged = [groups[g] for g, h in enumerate(hashes) if h is None]
    if hashed:
        for near in near_groups(np.stack([hashes[g] for g in hashed]), near_bits):
            merged.append(sorted(i for g in near for i in groups[hashed[g]]))
    return sorted(merged, key=lambda group: group[0])


def _groups(src: Path, labels_csv: Path | None, classes_csv: Path | None) -> tuple[dict[str, Placed], int]:
    """{class (or "" for tagged images): its images, each with its path under a split}, and how many
    images lie outside them."""
    if labels_csv is not None:
        tags = read_tags(labels_csv)  # a table that will not read is refused before anything is written
        files = listed_images(src, tags, labels_csv.name, "tags")
        if len(files) < 2:
            raise DataError(f"expected at least 2 images in {src} to split, got {len(files)}")
        return {"": [(f, f.relative_to(src)) for f in files]}, 0
    if classes_csv is not None:
        table = read_classes(classes_csv)
        by_class: dict[str, Placed] = {}
        for f in listed_images(src, table, classes_csv.name, "class"):
            by_class.setdefault(table[f.stem], []).append((f, Path(table[f.stem]) / f.relative_to(src)))
        return _classes(dict(sorted(by_class.items())), f"{classes_csv.name} names", lambda c: f"class {c!r}"), 0
    folders = sorted(p for p in src.iterdir() if p.is_dir() and not hidden(p, src))
    if len(folders) < 2:
        tagged = ("; images with a table of their classes: give it with --classes-csv (multi-label tags: --labels-csv)"
                  if image_files(src) else "")
        raise DataError(f"expected at least 2 class folders in {src} (<class>/*.jpg), got {len(folders)}{tagged}")
    # an empty one refused, as train refuses it
    groups = {p.name: [(f, f.relative_to(src)) for f in class_images(p)] for p in folders}
    return _classes(groups, f"{src} holds", lambda c: f"class folder {src / c}"), loose_images(src)


def _classes(groups: dict[str, Placed], where: str, named: Callable[[str], str]) -> dict[str, Placed]:
    """Classes to hold out from: at least two, each of at least two images."""
    if len(groups) < 2:
        raise DataError(f"expected at least 2 classes to split, got {len(groups)}: {where} {sorted(groups)}")
    small = [name for name, files in groups.items() if len(files) < 2]
    if small:
        raise DataError(f"{named(small[0])}: expected at least 2 images to hold one out, got {len(groups[small[0]])}")
    return groups


def _place(source: Path, target: Path) -> bool:
    """Hard-link `source` at `target`, or copy it where no link can be made; True if copied."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
        return False
    except OSError as exc:
        if exc.errno not in _NO_LINK:
            raise
    shutil.copy2(source, target)
    return True


def _check_places(src: Path, out: Path) -> None:
    if not src.is_dir():
        raise DataError(f"data folder not found: {src}")
    if (src / "train").is_dir():
        raise DataError(f"{src} holds a train/ folder: expected class folders to split (to hold out part of "
                        f"train/, split {src / 'train'})")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"{out}: expected a new or empty folder to write train/ and valid/ into, got "
                        + ("a file" if not out.is_dir() else "one with files in it"))
    resolved = out.resolve()
    if resolved == src.resolve() or src.resolve() in resolved.parents:
        raise DataError(f"{out}: expected a folder outside {src} (its images would be read as a class)")


def split_dataset(src: Path, out: Path, pct: float, seed: int = 0, labels_csv: Path | None = None,
                  classes_csv: Path | None = None, near_bits: int | None = None) -> HoldoutResult:
    """SRC/<class>/... into OUT/train and OUT/valid, `pct` of each class in valid, chosen by `seed`,
    each file at its path under SRC. Or SRC/*.jpg with a table: ``classes_csv`` names each image's
    class (each lands in OUT/<split>/<class>/), ``labels_csv`` its tags (copied to OUT). With
    ``near_bits``, images of a class that look alike are held out together too."""
    src, out = Path(src), Path(out)
    check_pct(pct)
    check_near_bits(near_bits)
    if labels_csv is not None and classes_csv is not None:
        raise DataError("data split: expected one table, --labels-csv (tags) or --classes-csv (one class each), got both")
    _check_places(src, out)
    groups, outside = _groups(src, labels_csv, classes_csv)
    units = {name: _units(placed, name, near_bits) for name, placed in groups.items()}
    rng = np.random.default_rng(seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".partial"))
    counts, copied = {"train": 0, "valid": 0}, 0
    try:
        for held in units.values():
            for split, chosen in zip(("train", "valid"), holdout(held, pct, rng)):
                for path, target in (pair for unit in chosen for pair in unit):
                    copied += _place(path, staging / split / target)
                    counts[split] += 1
        if labels_csv is not None:
            shutil.copy2(labels_csv, staging / labels_csv.name)
        if out.is_dir():
            out.rmdir()  # empty, checked above
        staging.chmod(0o755)  # mkdtemp's 0700 would hide the data from other users
        staging.rename(out)
    except OSError as exc:
        raise DataError(f"data split: cannot write {out}: {exc.strerror or exc}") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already where the rename took it
    return HoldoutResult(counts["train"], counts["valid"], 0 if labels_csv is not None else len(groups), copied, outside)
