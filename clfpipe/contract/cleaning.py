"""The data-cleaning table: fastai's ``ImageClassifierCleaner`` as a file a user edits. Every image
of a run's data (both splits) is ranked by its loss under the trained model, highest first
(fastai's ``top_losses``), with an action to edit: ``keep``, ``delete`` (moved aside, never
unlinked) or the name of the class it belongs to (moved into that class's folder of its split); a
multi-label image's action may be its tags instead (its row of the run's tags table is rewritten).
Reading the edited table checks every row, and where each file would go, before anything moves."""

from __future__ import annotations

import csv
import io
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Sequence

import numpy as np

from clfpipe.contract.dataset import (
    IMAGE_SUFFIXES,
    SPLITS,
    aside_targets,
    csv_text,
    image_files,
    move_files,
    read_tags,
    split_folder,
    tag_names,
    write_tags,
)
from clfpipe.contract.errors import DataError
from clfpipe.contract.manifest import RunDir
from clfpipe.contract.probabilities import sigmoid, tagged

KEEP, DELETE = "keep", "delete"
NO_TAGS = "-"  # a multi-label image with none of the tags, as 'clfpipe predict' names it
TABLE = "cleaning.csv"
ASIDE = "removed"  # where deleted images go by default: DATA/removed, outside both splits
COLUMNS = ("rank", "file", "split", "label", "predicted", "p_label", "loss", "action")
SHOWN_CLASSES = 12  # an error lists at most this many of a run's classes


@dataclass(frozen=True)
class Ranked:
    """One image's row; ``file`` is its path under the data folder, '/'-separated."""

    file: str
    split: str
    label: str
    predicted: str
    p_label: float
    loss: float


def _views(logits: np.ndarray) -> np.ndarray:
    """Logits as (views, N, C) in float64: one view where they are (N, C)."""
    z = np.asarray(logits, dtype=np.float64)
    return z[None] if z.ndim == 2 else z


def _log_mean_exp(log_p: np.ndarray) -> np.ndarray:
    """log(mean over the first axis of exp(log_p)), by log-sum-exp: the log of a mean of
    probabilities, finite where every one of them underflows."""
    top = log_p.max(axis=0)
    return top + np.log(np.exp(log_p - top).mean(axis=0))


def _log_softmax(z: np.ndarray) -> np.ndarray:
    top = z.max(axis=-1, keepdims=True)
    return z - top - np.log(np.exp(z - top).sum(axis=-1, keepdims=True))


def _log_sigmoid(z: np.ndarray) -> np.ndarray:
    return -(np.maximum(-z, 0) + np.log1p(np.exp(-np.abs(z))))


def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Each image's -log p(label), p the softmax, or its mean over TTA views where logits are
    (views, N, C); in float64 by log-sum-exp: a probability that underflows to 0 would make a loss
    of inf, and every such image would rank the same."""
    z = _views(logits)
    log_p = _log_softmax(z)[:, np.arange(z.shape[1]), np.asarray(labels)]
    return -_log_mean_exp(log_p)


def binary_cross_entropy(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Each image's mean over tags of -log p(tag as labelled), p the sigmoid (fastai's
    BCEWithLogitsLossFlat per image), or its mean over TTA views where logits are (views, N, C);
    in float64 and stable for any logit."""
    z, y = _views(logits), np.asarray(targets, dtype=np.float64)
    loss = -(y * _log_mean_exp(_log_sigmoid(z)) + (1 - y) * _log_mean_exp(_log_sigmoid(-z)))
    return loss.mean(axis=1)


def rank(files: Sequence[str], splits: Sequence[str], labels: np.ndarray, logits: np.ndarray, classes: Sequence[str],
         threshold: float | None = None) -> list[Ranked]:
    """The images by loss, highest first; equal losses keep the files' order. Single-label: the
    cross-entropy, p(label), the top class. With a ``threshold``, labels are multi-hot tags: the
    mean binary cross-entropy over tags, its exp(-loss) (the geometric mean of p(tag as labelled)),
    and the tags above the threshold. Logits (views, N, C) rank by the TTA views' mean
    probabilities, as the served TTA ensemble answers."""
    z = _views(logits)
    if threshold is None:
        loss = cross_entropy(z, labels)
        label = [classes[i] for i in labels]
        predicted = [classes[i] for i in np.exp(_log_softmax(z)).mean(axis=0).argmax(1)]
    else:
        loss = binary_cross_entropy(z, labels)
        # '-', not '': a predicted cell copied into the action retags the image (an empty action keeps it)
        label = [tag_names(row, classes) or NO_TAGS for row in np.asarray(labels)]
        predicted = [tag_names(row, classes) or NO_TAGS for row in tagged(sigmoid(z).mean(axis=0), threshold)]
    return [Ranked(files[i], splits[i], label[i], predicted[i], float(np.exp(-loss[i])), float(loss[i]))
            for i in np.argsort(-loss, kind="stable")]


def table_bytes(rows: Sequence[Ranked]) -> bytes:
    """The table as 'clfpipe data clean' writes it: every action ``keep``."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(COLUMNS)
    for number, row in enumerate(rows, 1):
        writer.writerow([number, row.file, row.split, row.label, row.predicted, f"{row.p_label:.4g}", f"{row.loss:.4f}", KEEP])
    return buf.getvalue().encode("utf-8")


@dataclass(frozen=True)
class Plan:
    """What an edited table asks for: files to move aside, (file, its place in another class's
    folder), and (file, its new tags) with the tags table that holds them."""

    delete: tuple[Path, ...]
    relabel: tuple[tuple[Path, Path], ...]
    retag: tuple[tuple[Path, tuple[str, ...]], ...] = ()
    tags_table: Path | None = None

    def __len__(self) -> int:
        return len(self.delete) + len(self.relabel) + len(self.retag)


def _listed(classes: Sequence[str]) -> str:
    shown = ", ".join(classes[:SHOWN_CLASSES])
    return shown + (f" and {len(classes) - SHOWN_CLASSES} more" if len(classes) > SHOWN_CLASSES else "")


@dataclass(frozen=True)
class _Row:
    parts: tuple[str, ...]  # split folder, then (class folders) the class, then the rest of the path
    action: str  # keep, delete, the class it moves to, or RETAG
    label: str | None = None  # as the table says (None: no such column; empty: not said)
    tags: tuple[str, ...] = ()  # RETAG's new tags, in the run's order


RETAG = "retag"  # a row's action once read as new tags (never a table's word: a tag list is)


@dataclass(frozen=True)
class _Layout:
    """What the table's paths are read against: the split folders' names, and the run's classes
    (class folders) or its tags (images directly in the split folders, tags in a table)."""

    roots: tuple[str, ...]
    classes: tuple[str, ...]
    tags: bool

    def where(self) -> str:
        return " or ".join(f"{r}/" if self.tags else f"{r}/<class>/" for r in self.roots)


def _path(file: str, where: str, layout: _Layout) -> tuple[str, ...]:
    """The parts of a row's path under the data folder, checked against the layout."""
    path = PurePosixPath(file)
    parts = path.parts
    # a part starting with '.' is '..', or hidden from the layout (it reads no such file)
    if (path.is_absolute() or len(parts) < (2 if layout.tags else 3) or parts[0] not in layout.roots
            or any(p.startswith(".") for p in parts)):
        raise DataError(f"{where}: file: expected a path under {layout.where()} (no part starting with '.'), "
                        f"got {file[:200]!r}")
    if not layout.tags and parts[1] not in layout.classes:
        raise DataError(f"{where}: {file[:200]!r}: expected a folder of one of the run's classes "
                        f"({_listed(layout.classes)}), got {parts[1][:40]!r}")
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise DataError(f"{where}: {file[:200]!r}: expected an image ({', '.join(IMAGE_SUFFIXES)})")
    return parts


def _row(row: dict, where: str, layout: _Layout) -> _Row:
    """One row checked against the layout and the run's classes; the file's existence is checked later."""
    parts = _path((row.get("file") or "").strip(), where, layout)
    label = (row.get("label") or "").strip()
    if not layout.tags and label and label != parts[1]:
        raise DataError(f"{where}: label {label[:40]!r}, but the file is in {parts[1][:40]!r}'s folder: expected the table "
                        "'clfpipe data clean' wrote for this data (was the file moved since?)")
    action = (row.get("action") or "").strip() or KEEP
    if layout.tags and action not in (KEEP, DELETE):
        return _Row(parts, RETAG, row.get("label"), _tags(action, where, layout.classes))
    if action not in (KEEP, DELETE) and action not in layout.classes:
        raise DataError(f"{where}: action: expected keep, delete or one of the run's classes ({_listed(layout.classes)}), "
                        f"got {action[:40]!r}")
    return _Row(parts, KEEP if not layout.tags and action == parts[1] else action, row.get("label"))


def _tags(action: str, where: str, classes: Sequence[str]) -> tuple[str, ...]:
    """A multi-label row's action read as its image's tags, space-separated ('-' for none), in the run's order."""
    named = set(action.split()) - ({NO_TAGS} - set(classes))
    unknown = sorted(named - set(classes))
    if unknown:
        raise DataError(f"{where}: action: expected keep, delete or the image's tags, space-separated ('{NO_TAGS}' for none), "
                        f"each one of the run's ({_listed(classes)}), got {unknown[0][:40]!r}")
    return tuple(c for c in classes if c in named)


DELIMITERS = (",", ";", "\t")  # spreadsheets save CSV with ';' where ',' is the decimal mark, or tabs


def _delimiter(text: str) -> str:
    """The delimiter whose header holds the columns file and action (',' where none does)."""
    header = text.split("\n", 1)[0]
    return next((d for d in DELIMITERS if {"file", "action"} <= {c.strip().strip('"') for c in header.split(d)}), ",")


def _rows(csv_path: Path, layout: _Layout) -> list[_Row]:
    """The table's rows that move a file, each file listed once."""
    text = csv_text(csv_path)
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=_delimiter(text))
    rows: list[_Row] = []
    seen: set[tuple[str, ...]] = set()
    try:
        if reader.fieldnames is None or not {"file", "action"} <= set(reader.fieldnames):
            raise DataError(f"{csv_path}: expected the columns file and action ('clfpipe data clean' writes "
                            f"{','.join(COLUMNS)}), got {(reader.fieldnames or [])[:10]}")
        for raw in reader:
            where = f"{csv_path} line {reader.line_num}"
            row = _row(raw, where, layout)
            if row.parts in seen:
                raise DataError(f"{where}: expected each file once, got {'/'.join(row.parts)[:200]!r} again")
            seen.add(row.parts)
            if row.action != KEEP:
                rows.append(row)
    except csv.Error as exc:
        raise DataError(f"{csv_path} line {reader.line_num}: not CSV ({exc})") from exc
    return rows


def read_plan(csv_path: Path, data_dir: Path, classes: Sequence[str], labels_csv: str = "") -> Plan:
    """The moves an edited table asks for in ``data_dir``, every one checked: each file is there, no
    two land on one place, nothing is overwritten, and every class keeps an image in each split
    (training reads every class from both). With ``labels_csv`` (the tags table of a multi-label
    run's images), each split keeps an image and rows may retag theirs (``_retags``). One DataError
    names the first problem."""
    data_dir = Path(data_dir)
    layout = _Layout(tuple(split_folder(data_dir, split, "").name for split in SPLITS), tuple(classes), bool(labels_csv))
    rows = _rows(Path(csv_path), layout)
    for row in rows:
        if not data_dir.joinpath(*row.parts).is_file():
            raise DataError(f"{csv_path}: {'/'.join(row.parts)!r}: expected a file in {data_dir}, got none "
                            "(moved by an earlier --apply?)")
    moving = [r for r in rows if r.action != RETAG]
    relabel = tuple((data_dir.joinpath(*r.parts), data_dir.joinpath(r.parts[0], r.action, *r.parts[2:]))
                    for r in moving if r.action != DELETE)
    targets = Counter(target for _, target in relabel)
    for target, n in targets.items():
        if n > 1 or target.exists() or target.is_symlink():
            raise DataError(f"{csv_path}: relabelling would move {'two files' if n > 1 else 'a file'} onto {target}: "
                            "expected a name free in its new class folder (rename the file, or delete one)")
    _check_kept(data_dir, moving, 1 if labels_csv else 2)
    delete = tuple(data_dir.joinpath(*r.parts) for r in moving if r.action == DELETE)
    if not labels_csv:
        return Plan(delete, relabel)
    return Plan(delete, relabel, _retags(Path(csv_path), data_dir, rows, labels_csv), data_dir / labels_csv)


def _retags(csv_path: Path, data_dir: Path, rows: Sequence[_Row], labels_csv: str) -> tuple[tuple[Path, tuple[str, ...]], ...]:
    """(file, new tags) of the rows that change an image's tags. Refused: a row whose ``label`` is
    not its image's tags now (applied already, or the tags table edited since), an image whose row
    of the tags table (keyed by file stem) names another image too, and a plan that leaves a
    validation image a tag no training image keeps (training's tags are train/'s)."""
    table = read_tags(data_dir / labels_csv)
    files = {relative(f, data_dir): f for split in SPLITS for f in image_files(split_folder(data_dir, split, ""))}
    stems = Counter(f.stem for f in files.values())
    now = {name: set(table.get(f.stem, ())) for name, f in files.items()}
    retag: dict[str, tuple[str, ...]] = {}
    for row in rows:
        name = "/".join(row.parts)
        if row.action == KEEP:
            continue
        if name not in files:  # e.g. a second path to a folder the walk read once
            raise DataError(f"{csv_path}: {name!r}: expected an image training reads, got a path it does not read")
        if (row.label or "").strip() and set(row.label.split()) - {NO_TAGS} != now[name] - {NO_TAGS}:
            raise DataError(f"{csv_path}: {name!r}: label {row.label.strip()[:60]!r}, but its tags in {labels_csv} are "
                            f"{' '.join(sorted(now[name]))[:60] or NO_TAGS!r}: expected the table 'clfpipe data clean' wrote "
                            "for this data (applied already?)")
        if row.action == RETAG and set(row.tags) != now[name]:
            if stems[files[name].stem] > 1:
                raise DataError(f"{csv_path}: {name!r}: its row of {labels_csv} ({files[name].stem!r}) names another image "
                                "of the data too: expected one image a row to retag it (rename one)")
            retag[name] = row.tags
    gone = {"/".join(r.parts) for r in rows if r.action == DELETE}
    _check_trained_tags(files, {**now, **{n: set(t) for n, t in retag.items()}}, gone, split_folder(data_dir, "train", "").name)
    return tuple((files[name], tags) for name, tags in retag.items())


def _check_trained_tags(files: dict[str, Path], tags: dict[str, set[str]], gone: set[str], train: str) -> None:
    """Every tag of a validation image that stays is a training image's too."""
    kept = [name for name in files if name not in gone]
    trained = set().union(*(tags[n] for n in kept if n.split("/")[0] == train))
    for name in kept:
        if missing := sorted(tags[name] - trained):
            raise DataError(f"the table leaves {name} tagged {missing[0]!r}, a tag of no training image: expected every "
                            "tag of a validation image on a training image too (training's tags are train/'s)")


def _check_kept(data_dir: Path, rows: Sequence[_Row], depth: int) -> None:
    """Every folder ``depth`` parts deep (a split, or a split's class) keeps an image."""
    leaving = Counter(r.parts[:depth] for r in rows)
    arriving = Counter((r.parts[0], r.action) for r in rows if r.action != DELETE)
    for folder, n in leaving.items():
        if len(image_files(data_dir.joinpath(*folder))) - n + arriving[folder] < 1:
            raise DataError(f"the table leaves {data_dir.joinpath(*folder)} without an image: expected "
                            + ("each split to keep one" if depth == 1 else
                               "every class to keep one in each split (training reads every class from both)"))


def run_plan(run_dir: Path, csv_path: Path, data_dir: Path | None = None) -> tuple[Path, Plan]:
    """(the data folder, the plan) of an edited table for a run's data (default: the folder training read)."""
    run = RunDir(run_dir)
    manifest = run.read()
    data = run.data_dir(manifest, data_dir)
    return data, read_plan(csv_path, data, manifest.classes, manifest.recipe.data.labels_csv)


def apply_plan(plan: Plan, data_dir: Path, move_to: Path, *, dry_run: bool = False) -> list[tuple[Path, Path]]:
    """The plan's moves, (from, to): deleted files to ``move_to`` at their paths under ``data_dir``,
    relabelled ones into their new class folders; its new tags written into the tags table first.
    Every target is checked before the first change; ``dry_run`` changes nothing."""
    moves = [*zip(plan.delete, aside_targets(plan.delete, data_dir, move_to)), *plan.relabel]
    if not dry_run:
        if plan.retag and plan.tags_table is not None:
            write_tags(plan.tags_table, {file.stem: tags for file, tags in plan.retag})
        move_files(moves, "data clean")
    return moves


def relative(path: Path, data_dir: Path) -> str:
    """A file's path under the data folder, '/'-separated (a symlinked file as its link's place)."""
    return PurePosixPath(*Path(os.path.abspath(path)).relative_to(os.path.abspath(data_dir)).parts).as_posix()
