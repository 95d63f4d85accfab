"""The fast.ai folder layout: DATA/train/<class>/*.jpg and DATA/valid/<class>/*.jpg."""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import os
import shutil
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence, TypeVar

import numpy as np
from PIL import Image

from clfpipe.contract.errors import DataError, first_line
from clfpipe.contract.manifest import atomic_write_bytes
from clfpipe.contract.preprocess import ENCODINGS, FORMATS, check_jpeg_bytes, check_size, load_image
from clfpipe.contract.progress import progress
from clfpipe.contract.similar import check_near_bits, nearest_earlier, perceptual_hash

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


def hidden(path: Path, root: Path) -> bool:
    """A dot-file or anything in a dot-folder under root: macOS's ._name.jpg resource forks,
    .ipynb_checkpoints, .git; fastai's get_files leaves them out too."""
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _is_image(path: Path, root: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not hidden(path, root) and path.is_file()


def walk_files(folder: Path) -> Iterator[Path]:
    """Every file under `folder`, hidden ones left out, through symlinked folders too (as
    torchvision's ImageFolder and fastai walk, ``followlinks=True``) but each folder once, so a
    link to a folder above it ends rather than loops. Paths stay under `folder` (not resolved)."""
    seen: set[tuple[int, int]] = set()
    for top, dirs, files in os.walk(folder, followlinks=True):
        st = os.stat(top)
        if (st.st_dev, st.st_ino) in seen:
            dirs[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        yield from (Path(top) / name for name in files if not name.startswith("."))


def image_files(folder: Path) -> list[Path]:
    """The images under `folder`, its subfolders too (as torchvision's ImageFolder and fastai's
    get_image_files read a class folder), sorted, hidden ones left out."""
    return sorted(p for p in walk_files(folder) if _is_image(p, folder))


def loose_images(folder: Path) -> int:
    """Images directly in `folder` (not in a subfolder), hidden ones left out."""
    return sum(1 for p in Path(folder).iterdir() if _is_image(p, folder))


def class_images(folder: Path) -> list[Path]:
    """A class folder's ``image_files``; DataError where it has none (no class is left out unsaid)."""
    images = image_files(folder)
    if not images:
        raise DataError(f"class folder has no images: {folder} (expected files ending in {', '.join(IMAGE_SUFFIXES)})")
    return images


def header_problem(path: Path) -> str | None:
    """Why a file is no usable image by its header alone (no full decode), None when it is one:
    not an image of the formats read here, a corrupt header, or a size outside the bounds that
    every decoder here and the server apply (``check_size``; a JPEG too short for its pixels)."""
    try:
        with Image.open(path, formats=FORMATS) as img:
            if (too_big := _size_problem(img, path)) is not None:
                return too_big  # before verify(), which reads every chunk of a PNG
            img.verify()
    except Image.UnidentifiedImageError:
        with open(path, "rb") as fh:
            head = fh.read(8)
        return f"not an image: expected {ENCODINGS} bytes, got " + (f"a file starting {head!r}" if head else "an empty file")
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for corrupt files
        return f"not a decodable image: {first_line(exc)}"  # as the server says it ('Truncated File Read' alone said little)
    return None


def _size_problem(img: Image.Image, path: Path) -> str | None:
    try:
        check_size(img.width, img.height)
        if img.format == "JPEG":
            check_jpeg_bytes(img.width, img.height, path.stat().st_size)
    except ValueError as exc:
        return first_line(exc)
    return None


def check_images(files: Sequence[Path], data_dir: Path) -> None:
    """Every file's header (``header_problem``): a DataError naming the first unusable one and
    counting the others, so that one run of ``clfpipe data check`` finds them all."""
    bad = [(path, why) for path in files if (why := header_problem(path)) is not None]
    if bad:
        more = (f" ({len(bad) - 1} more: 'clfpipe data check {data_dir}' lists every one and can move them aside)"
                if len(bad) > 1 else "")
        raise DataError(f"unusable image file {bad[0][0]}: {bad[0][1]}{more}")


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
    raise DataError(f"expected a {wanted} folder in {data_dir} (layout {names[0]}/{layout}), got none"
                    f"{_split_hint(Path(data_dir), split)}")


def _split_hint(data_dir: Path, split: str) -> str:
    """Where DATA has no validation folder, or only class folders, the command that makes one."""
    if split == "valid" and (data_dir / "train").is_dir():
        return (f"; to hold out part of train/ for it: clfpipe data split {data_dir / 'train'} "
                f"NEW_FOLDER{_option(_table(data_dir))}")
    if split != "train":
        return ""
    if any(p.is_dir() and not hidden(p, data_dir) for p in data_dir.iterdir()):
        return f"; to split class folders into train/ and valid/: clfpipe data split {data_dir} NEW_FOLDER"
    table = _table(data_dir)
    if table and loose_images(data_dir):
        what = "tagged images" if table[1] else "images by the classes in the table"
        return f"; to split {what} into train/ and valid/: clfpipe data split {data_dir} NEW_FOLDER{_option(table)}"
    return ""


def _table(data_dir: Path) -> tuple[Path, bool] | None:
    """The first CSV in DATA, and whether it holds tags (a ``tags`` column: multi-label) rather than
    one class per image."""
    tables = sorted(p for p in Path(data_dir).glob("*.csv") if p.is_file())
    if not tables:
        return None
    try:
        with tables[0].open(encoding="utf-8-sig", errors="replace", newline="") as f:
            header = next(csv.reader([f.readline(1 << 16)]), [])  # a header, not a whole file without newlines
    except (OSError, csv.Error):
        header = []
    return tables[0], "tags" in [h.strip() for h in header] or not header


def _option(table: tuple[Path, bool] | None) -> str:
    """The data split option that reads the table."""
    return "" if table is None else f" --{'labels' if table[1] else 'classes'}-csv {table[0]}"


def _labels_hint(data_dir: Path, root: Path) -> str:
    """Where DATA holds a CSV, what reads the images of `root` from it instead of class folders."""
    table = _table(data_dir)
    if table is None:
        return ""
    path, tags = table
    if tags:
        return (f"; {path.name} is there: multi-label data is read from its table with data.labels_csv = {path.name!r} "
                f"(data check: --labels-csv {path.name})")
    return (f"; {path.name} is there: to put each image in its class's folder and hold out a valid/: "
            f"clfpipe data split {root} NEW_FOLDER{_option(table)}")


def scan_split(data_dir: Path, split: str, classes: tuple[str, ...] | None = None, *, verify: bool = True,
               some_classes: bool = False) -> Split:
    """Read DATA/<split>/<class>/...; classes default to the sorted folder names. Given classes, the
    folders are those classes, or with ``some_classes`` any of them (a sample to check a model on)."""
    root = split_folder(data_dir, split, "<class>/*.jpg")
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and not hidden(p, root))  # .ipynb_checkpoints is no class
    if classes is None:
        classes = tuple(found)
        if len(classes) < 2:
            raise DataError(f"expected at least 2 class folders in {root}, got {len(classes)}{_labels_hint(data_dir, root)}")
    elif some_classes and (not found or not set(found) <= set(classes)):
        raise DataError(f"{root}: expected class folders among {list(classes)}, got {found}")
    elif not some_classes and sorted(classes) != found:
        raise DataError(f"{root}: expected class folders {list(classes)}, got {found}")
    files: list[Path] = []
    labels: list[int] = []
    for index, name in enumerate(classes):
        if name not in found:
            continue  # some_classes: a class this sample lacks
        images = class_images(root / name)
        files.extend(images)
        labels.extend([index] * len(images))
    if verify:
        check_images(files, data_dir)
    return Split(tuple(files), tuple(labels), tuple(classes))


def read_tags(csv_path: Path) -> dict[str, tuple[str, ...]]:
    """Planet-style labels: a CSV with columns image,tags (tags space-separated); keys are file stems.
    Anything else is one DataError naming the line: not UTF-8, not CSV, a row without its image or
    tags, an image listed twice with other tags (which was meant was unsaid: the last row won)."""
    if not csv_path.is_file():
        raise DataError(f"labels file not found: {csv_path} (expected a CSV with columns image,tags)")
    reader = csv.DictReader(io.StringIO(csv_text(csv_path), newline=""))

    def header() -> None:
        if reader.fieldnames is None or not {"image", "tags"} <= set(reader.fieldnames):
            raise DataError(f"{csv_path}: expected columns image,tags, got {reader.fieldnames} (a table of one class per "
                            "image is read by 'clfpipe data split SRC NEW_FOLDER --classes-csv FILE' into class folders)")

    return _by_stem(csv_path, reader, header, _tag_row, " ".join, "other tags")


def write_tags(csv_path: Path, new: Mapping[str, tuple[str, ...]]) -> None:
    """The tags table with the rows of ``new``'s images (file stems) given those tags: every other
    line stays byte for byte as it was (quoting, byte-order mark, line ends), and an edited row
    keeps its line end. The file is replaced whole, by one renamed over it, or not at all."""
    raw, text = _csv_bytes_text(csv_path)
    lines = io.StringIO(text, newline="").readlines()  # the lines csv.reader reads, ends kept
    reader = csv.reader(iter(lines))
    try:
        header = next(reader, [])
        if not {"image", "tags"} <= set(header):
            raise DataError(f"{csv_path}: expected columns image,tags, got {header[:10]}")
        # the last column of each name, as read_tags's DictReader reads a header that repeats one
        image, tags = (len(header) - 1 - header[::-1].index(name) for name in ("image", "tags"))
        out, done = lines[:reader.line_num], reader.line_num
        for row in reader:
            if len(row) > max(image, tags) and Path(row[image]).stem in new:
                row[tags] = " ".join(new[Path(row[image]).stem])
                end = lines[reader.line_num - 1]
                buf = io.StringIO()
                csv.writer(buf, lineterminator=end[len(end.rstrip("\r\n")):]).writerow(row)
                out.append(buf.getvalue())
            else:
                out.extend(lines[done:reader.line_num])
            done = reader.line_num
    except csv.Error as exc:
        raise DataError(f"{csv_path}: not CSV ({exc})") from exc
    bom = "\ufeff" if raw.startswith(codecs.BOM_UTF8) else ""
    try:
        atomic_write_bytes(csv_path, (bom + "".join(out + lines[done:])).encode("utf-8"), csv_path.stat().st_mode & 0o7777)
    except OSError as exc:
        raise DataError(f"cannot rewrite {csv_path}: {exc.strerror or exc}") from exc


def read_classes(csv_path: Path) -> dict[str, str]:
    """Single-label labels as fastai's ``from_csv`` reads them (Kaggle's dog-breed labels.csv,
    ``id,breed``): a header row, then each image (its file name or stem) in the first column and its
    class in the second; keys are file stems. Anything else is one DataError naming the line: not
    UTF-8, not CSV, a row without its class, a class that cannot be a folder's name, an image listed
    twice with another class."""
    if not csv_path.is_file():
        raise DataError(f"classes file not found: {csv_path} (expected a CSV of image,class rows under a header)")
    reader = csv.reader(io.StringIO(csv_text(csv_path), newline=""))

    def header() -> None:
        if len(next(reader, [])) < 2:
            raise DataError(f"{csv_path}: expected a header row of at least two columns (image, class), got line 1 with fewer")

    return _by_stem(csv_path, reader, header, _class_row, str, "another class")


V = TypeVar("V")


def _by_stem(csv_path: Path, reader: Any, header: Callable[[], None], parse: Callable[[Any, str], tuple[str, str, V]],
             shown: Callable[[V], str], other: str) -> dict[str, V]:
    """The table's rows after its header, each (image as written, stem, value) by ``parse``, keyed by
    stem: one DataError naming the line for a row ``parse`` refuses, an image listed twice with
    ``other`` value, or text that is not CSV."""
    table: dict[str, V] = {}
    try:
        header()
        for row in reader:
            where = f"{csv_path} line {reader.line_num}"
            image, stem, value = parse(row, where)
            if table.get(stem, value) != value:
                raise DataError(f"{where}: expected each image once, got {image!r} again with {other} "
                                f"({shown(value)!r}, before {shown(table[stem])!r})")
            table[stem] = value
    except csv.Error as exc:
        raise DataError(f"{csv_path} line {reader.line_num}: not CSV ({exc})") from exc
    return table


def csv_text(csv_path: Path) -> str:
    """A CSV file's text, line ends as written (the csv module reads them, quoted ones in a cell too)."""
    return _csv_bytes_text(csv_path)[1]


def _csv_bytes_text(csv_path: Path) -> tuple[bytes, str]:
    """A CSV file's bytes, and its text as ``csv_text`` gives it."""
    try:
        raw = csv_path.read_bytes()
        return raw, raw.decode("utf-8-sig")  # Excel's byte-order mark is no part of the first column's name
    except UnicodeDecodeError as exc:
        raise DataError(f"{csv_path}: expected UTF-8 text, got byte {exc.object[exc.start]:#04x} at offset {exc.start}") from exc
    except OSError as exc:
        raise DataError(f"cannot read {csv_path}: {exc.strerror or exc}") from exc


def _tag_row(row: dict[str | None, Any], where: str) -> tuple[str, str, tuple[str, ...]]:
    """(image, file stem, tags) of one row; a short row leaves a column None."""
    image, tags = row.get("image"), row.get("tags")
    if not image or not Path(image).stem or tags is None:
        raise DataError(f"{where}: expected an image name and its tags, got {[v for k, v in row.items() if k is not None]}")
    return image, Path(image).stem, tuple(tags.split())


def _class_row(row: list[str], where: str) -> tuple[str, str, str]:
    """(image, file stem, class) of one row."""
    image, name = (row[0].strip(), row[1].strip()) if len(row) >= 2 else ("", "")
    if not image or not Path(image).stem or not name:
        raise DataError(f"{where}: expected an image name and its class, got {row}")
    if problem := class_name_problem(name):
        raise DataError(f"{where}: class {name[:40]!r} {problem}")
    return image, Path(image).stem, name


def class_name_problem(name: str) -> str | None:
    """Why a class name cannot be the class folder ``data split`` makes for it, or None."""
    if name in (".", "..") or any(c in "/\\" or ord(c) < 32 or ord(c) == 127 for c in name):
        return "cannot be a folder's name: expected no '/', '\\' or control character, and not '.' or '..'"
    if name.startswith("."):
        return "would be a hidden folder, which no command reads: expected a name not starting with '.'"
    if len(name.encode("utf-8", "surrogatepass")) > 255:
        return "is longer than a folder's name may be (255 bytes)"
    return None


def listed_images(folder: Path, table: dict[str, Any], table_name: str, what: str) -> list[Path]:
    """The images in `folder`, each of which the table (keyed by file stem) must name: one DataError
    counting those it does not."""
    files = image_files(folder)
    unlisted = [f for f in files if f.stem not in table]
    if unlisted:
        raise DataError(f"{table_name} has no {what} for {len(unlisted)} image(s) in {folder}, e.g. {unlisted[0].name}")
    return files


def scan_multilabel(data_dir: Path, split: str, labels_csv: str, classes: tuple[str, ...] | None = None, *,
                    verify: bool = True) -> Split:
    """DATA/<split>/*.jpg with tags from DATA/<labels_csv>; classes default to the sorted tags."""
    root = split_folder(data_dir, split, "*.jpg, tags in a CSV")
    tags = read_tags(Path(data_dir) / labels_csv)
    files = listed_images(root, tags, labels_csv, "tags")
    if not files:
        raise DataError(f"no images in {root} (expected files ending in {', '.join(IMAGE_SUFFIXES)})")
    if classes is None:
        classes = tuple(sorted({t for f in files for t in tags[f.stem]}))
    index = {c: i for i, c in enumerate(classes)}
    if verify:
        check_images(files, data_dir)
    labels = []
    for path in files:
        unknown = [t for t in tags[path.stem] if t not in index]
        if unknown:
            raise DataError(f"{path.name}: tag {unknown[0]!r} not among the training tags {list(classes)}")
        labels.append(tuple(int(c in tags[path.stem]) for c in classes))
    return Split(tuple(files), tuple(labels), tuple(classes))


def scan_data(data_dir: Path, split: str, labels_csv: str = "", classes: tuple[str, ...] | None = None, *,
              verify: bool = True, some_classes: bool = False) -> Split:
    """Single-label class folders (``some_classes``: see ``scan_split``), or multi-label tags when
    labels_csv is set."""
    if labels_csv:
        return scan_multilabel(data_dir, split, labels_csv, classes, verify=verify)
    return scan_split(data_dir, split, classes, verify=verify, some_classes=some_classes)


@dataclass(frozen=True)
class DataCheck:
    """What ``check_data`` found in a data folder."""

    images: int  # files read as images, every split
    unusable: tuple[tuple[Path, str], ...]  # (file, why), in the splits' order
    skipped: dict[str, int]  # other files under the splits by suffix: never read (hidden files left out)
    duplicates: tuple[Duplicate, ...] = ()  # usable files whose bytes an earlier one has
    near: tuple[NearCopy, ...] | None = None  # usable files that look like an earlier one (None: not looked for)


@dataclass(frozen=True)
class Duplicate:
    """A file with the same bytes as one read before it (train before valid, each in layout order)."""

    path: Path
    first: Path
    why: str  # what the copy does to training or to its score


@dataclass(frozen=True)
class NearCopy:
    """A file that looks like one read before it (perceptual hashes ``bits`` apart), bytes not the same."""

    path: Path
    first: Path
    bits: int
    why: str


@dataclass(frozen=True)
class _Read:
    """A usable image as ``check_data`` found it: its split and label."""

    path: Path
    split: str
    label: str


SPLITS = ("train", "valid")


MAX_CHECK_WORKERS = 256  # decoding threads: past the machine's cores they only add memory


def check_data(data_dir: Path, labels_csv: str = "", workers: int = 1, near_bits: int | None = None) -> DataCheck:
    """Every image the layout finds in DATA (both splits) decoded whole, as training and the
    server decode it: the files a run would stop on, all at once (as fastai's ``verify_images``);
    the files that repeat another's bytes (a validation image that training also reads, an image
    in two classes); with ``near_bits``, the files that look like another (``similar``).
    ``workers`` threads decode (Pillow releases the GIL while decoding)."""
    if not 1 <= workers <= MAX_CHECK_WORKERS:
        raise DataError(f"--workers: expected 1 to {MAX_CHECK_WORKERS}, got {workers}")
    check_near_bits(near_bits)
    data_dir = Path(data_dir)
    train = scan_data(data_dir, "train", labels_csv, verify=False)
    splits = [train, scan_data(data_dir, "valid", labels_csv, train.classes, verify=False)]
    files = [path for split in splits for path in split.files]
    inspect = partial(_inspected, hashing=near_bits is not None)
    with ThreadPoolExecutor(workers) as pool:
        found = list(progress(pool.map(inspect, files), "data check", total=len(files), unit="images"))
    unusable = tuple((path, why) for path, (why, _) in zip(files, found) if why is not None)
    where = [(name, split, i) for name, split in zip(SPLITS, splits) for i in range(len(split))]
    usable = [_Read(path, name, label_text(split, i)) for path, (name, split, i), (why, _) in zip(files, where, found)
              if why is None]
    roots = [split_folder(data_dir, split, "") for split in SPLITS]
    copies = _copies(usable)
    near = None
    if near_bits is not None:
        near = _near_copies(usable, [h for why, h in found if why is None], near_bits, {c.path for c in copies})
    return DataCheck(len(files), unusable, _skipped(roots, set(files)), copies, near)


def image_problem(path: Path) -> str | None:
    """Why a file is no usable image, by its header or its whole decode; None when it is one."""
    return _inspected(path, hashing=False)[0]


def _inspected(path: Path, hashing: bool) -> tuple[str | None, np.ndarray | None]:
    """(why the file is no usable image or None, its perceptual hash when ``hashing`` and usable).
    The whole decode (``load_image``) sees what a header check cannot, such as a truncated file."""
    if (problem := header_problem(path)) is not None:
        return problem, None
    try:
        img = load_image(path)
    except ValueError as exc:
        return first_line(exc).removeprefix(f"{path}: "), None
    return None, perceptual_hash(img) if hashing else None


def tag_names(row: Sequence[int], classes: Sequence[str]) -> str:
    """A multi-hot row as its tags, space-separated (a labels table's tags cell)."""
    return " ".join(c for c, on in zip(classes, row) if on)


def label_text(split: Split, index: int) -> str:
    """A file's class, or its tags."""
    label = split.labels[index]
    return tag_names(label, split.classes) if split.multi_label else split.classes[label]


def identical(files: Sequence[Path]) -> list[list[int]]:
    """The files' indices grouped by identical bytes, each group and the groups in the files'
    order. Only files of one size are read (and hashed): most files have a size no other has."""
    try:
        sizes = [f.stat().st_size for f in files]
        counts = Counter(sizes)
        groups: dict[object, list[int]] = {}
        for i, (f, size) in enumerate(zip(files, sizes)):
            key = (size, hashlib.sha256(f.read_bytes()).digest()) if counts[size] > 1 else i
            groups.setdefault(key, []).append(i)
    except OSError as exc:
        raise DataError(f"cannot read {exc.filename}: {exc.strerror or exc}") from exc
    return list(groups.values())


def _copies(read: Sequence[_Read]) -> tuple[Duplicate, ...]:
    """Each file whose bytes an earlier one has, in the files' order, with what the copy does."""
    found = []
    for group in identical([item.path for item in read]):
        for index in group[1:]:
            found.append((index, Duplicate(read[index].path, read[group[0]].path, _what_copy_does(read[group[0]], read[index]))))
    return tuple(duplicate for _, duplicate in sorted(found, key=lambda pair: pair[0]))


def _what_copy_does(was: _Read, item: _Read) -> str:
    """What a (near) copy of ``was`` does to training or to its score."""
    why = [f"labelled {was.label!r} there, {item.label!r} here"] if item.label != was.label else []
    if item.split != was.split:
        why.append("in both splits: the validation score counts an image training saw")
    return "; ".join(why) or "a second copy with the same label: trained on twice as often"


def _near_copies(read: Sequence[_Read], hashes: Sequence[np.ndarray], max_bits: int, copies: set[Path]) -> tuple[NearCopy, ...]:
    """Each file that looks like an earlier one, in the files' order; a byte copy is left to ``_copies``."""
    keep = [i for i, item in enumerate(read) if item.path not in copies]
    if not keep:
        return ()
    found = nearest_earlier(np.stack([hashes[i] for i in keep]), max_bits)
    return tuple(NearCopy(read[keep[j]].path, read[keep[i]].path, bits, _what_copy_does(read[keep[i]], read[keep[j]]))
                 for j, i, bits in found)


def _skipped(roots: Sequence[Path], read: set[Path]) -> dict[str, int]:
    """Files under ``roots`` that the layout does not read, by suffix; hidden ones (.DS_Store) left out."""
    counts: dict[str, int] = {}
    for root in roots:
        for path in walk_files(root):
            if path.is_file() and path not in read:
                suffix = path.suffix.lower() or "(none)"
                if suffix in IMAGE_SUFFIXES:  # an image where the class-folder layout does not look
                    suffix += " not in a class folder"
                counts[suffix] = counts.get(suffix, 0) + 1
    return dict(sorted(counts.items()))


def move_aside(files: Sequence[Path], data_dir: Path, dest: Path) -> list[Path]:
    """Move ``files`` (under ``data_dir``) to ``dest``, each at its path relative to ``data_dir``
    (``aside_targets``). Returns where each went."""
    targets = aside_targets(files, data_dir, dest)
    move_files(list(zip(files, targets)), "--move-to")
    return targets


def check_outside_splits(folder: Path, data_dir: Path, option: str) -> None:
    """``folder`` lies in no split folder of ``data_dir``: what is written there would be read as images."""
    where = Path(folder).resolve()
    for split in SPLITS:
        try:
            root = split_folder(data_dir, split, "").resolve()
        except DataError:  # no such split: nothing to keep out of
            continue
        if where == root or root in where.parents:
            raise DataError(f"{option}: expected a folder outside {root}, got {folder}")


def aside_targets(files: Sequence[Path], data_dir: Path, dest: Path) -> list[Path]:
    """Where ``move_aside`` puts ``files``: ``dest``, each at its path relative to ``data_dir``;
    nothing is overwritten, and ``dest`` may not lie in a split folder (its files would be read
    again). Nothing is moved here."""
    dest = Path(dest)
    check_outside_splits(dest, data_dir, "--move-to")
    # absolute, not resolved: a symlinked file moves as the link, at the link's place
    targets = [Path(os.path.abspath(dest)) / Path(os.path.abspath(f)).relative_to(os.path.abspath(data_dir)) for f in files]
    taken = [t for t in targets if t.exists() or t.is_symlink()]
    if taken:
        raise DataError(f"--move-to: {taken[0]} already exists: expected a folder without these files")
    return targets


def move_files(moves: Sequence[tuple[Path, Path]], what: str) -> None:
    """Each (source, target) moved, its target's folder made; the first failure is one DataError
    that says how many were moved before it."""
    for done, (source, target) in enumerate(moves):
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(source, target)
        except OSError as exc:
            before = f" ({done} moved before it)" if done else ""
            raise DataError(f"{what}: cannot move {source} to {target}: {exc.strerror or exc}{before}") from exc
