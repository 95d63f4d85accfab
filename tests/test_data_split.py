"""`clfpipe data split`: a folder of class folders into train/ and valid/ (fastai's valid_pct, per
class), by hard links; the source untouched, the new folder whole or absent."""

from __future__ import annotations

import math
import shutil
import string
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from clfpipe.cli import main
from clfpipe.contract import holdout
from clfpipe.contract.dataset import image_files, scan_data, scan_split
from clfpipe.contract.errors import DataError
from clfpipe.contract.holdout import check_pct, split_dataset, valid_count
from clfpipe.contract.similar import NEAR_BITS
from clfpipe.demo_data import DemoSpec, detailed_image, write_demo_dataset, write_demo_multilabel


@pytest.fixture
def flat(tmp_path):
    """Class folders without train/ and valid/: the demo's train split, a subfolder and a hidden file in it."""
    demo = tmp_path / "demo"
    write_demo_dataset(demo, spec=DemoSpec(train_per_class=10, valid_per_class=1, image_size=32))
    src = tmp_path / "flat"
    shutil.copytree(demo / "train", src)
    (src / "checker" / "2019").mkdir()
    next((src / "checker").glob("*.jpg")).rename(src / "checker" / "2019" / "old.jpg")
    (src / "checker" / "._old.jpg").write_bytes(b"\0\5\26\7")
    return src


@pytest.mark.parametrize("n, pct, expected", [(10, 0.2, 2), (5, 0.2, 1), (2, 0.9, 1), (3, 0.01, 1), (100, 0.25, 25), (7, 0.5, 4)])
def test_valid_count_rounds_and_leaves_one_image_in_each_split(n, pct, expected):
    assert valid_count(n, pct) == expected


def test_each_class_is_split_by_its_share_and_every_image_lands_once(flat, tmp_path, capsys):
    before = {p: p.read_bytes() for p in flat.rglob("*") if p.is_file()}
    out = tmp_path / "split"
    assert main(["data", "split", str(flat), str(out), "--valid-pct", "0.3", "--seed", "1"]) == 0
    assert capsys.readouterr().out.strip() == f"wrote 21 train and 9 valid images of 3 classes to {out} (hard links)"
    train, valid = scan_split(out, "train"), scan_split(out, "valid", ("checker", "horizontal", "vertical"))
    assert [np.bincount(s.labels).tolist() for s in (train, valid)] == [[7, 7, 7], [3, 3, 3]]
    placed = sorted(p.relative_to(out / s).as_posix() for s in ("train", "valid") for p in image_files(out / s))
    assert placed == sorted(p.relative_to(flat).as_posix() for p in image_files(flat))  # the subfolder's image too
    assert {p: p.read_bytes() for p in flat.rglob("*") if p.is_file()} == before
    assert all(p.stat().st_nlink == 2 for p in image_files(out))  # links, not copies
    again = tmp_path / "again"
    split_dataset(flat, again, 0.3, seed=1)
    assert sorted(p.relative_to(again) for p in image_files(again)) == sorted(p.relative_to(out) for p in image_files(out))


def test_files_are_copied_where_no_hard_link_can_be_made(flat, tmp_path, monkeypatch):
    def cross_device(src, dst):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(holdout.os, "link", cross_device)
    result = split_dataset(flat, tmp_path / "split", 0.2)
    assert result.copied == result.train + result.valid == 30
    assert all(p.stat().st_nlink == 1 for p in image_files(tmp_path / "split"))


def test_an_interrupted_split_leaves_nothing(flat, tmp_path, monkeypatch):
    placed = []

    def place_then_stop(source, target):
        placed.append(target)
        if len(placed) == 5:
            raise KeyboardInterrupt
        return False

    monkeypatch.setattr(holdout, "_place", place_then_stop)
    with pytest.raises(KeyboardInterrupt):
        split_dataset(flat, tmp_path / "split", 0.2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo", "flat"]


def test_multi_label_images_are_split_with_their_table(tmp_path):
    demo = tmp_path / "ml"
    write_demo_multilabel(demo, seed=0)
    result = split_dataset(demo / "train", tmp_path / "split", 0.25, labels_csv=demo / "labels.csv")
    train = scan_data(tmp_path / "split", "train", "labels.csv", verify=False)
    valid = scan_data(tmp_path / "split", "valid", "labels.csv", train.classes, verify=False)
    assert (len(train), len(valid)) == (result.train, result.valid) and result.valid == round(0.25 * len(image_files(demo / "train")))


@given(pct=st.floats(allow_nan=True, allow_infinity=True))
def test_any_fraction_is_taken_or_refused_in_one_error(pct):
    try:
        check_pct(pct)
    except DataError as exc:
        assert not 0 < pct < 1 and str(exc).startswith("--valid-pct: expected a fraction between 0 and 1")
    else:
        assert 0 < pct < 1 and valid_count(2, pct) == 1


@pytest.mark.parametrize("args, expected", [
    (["--valid-pct", "0"], "--valid-pct: expected a fraction between 0 and 1 (0.2 holds out a fifth), got 0.0"),
    (["--valid-pct", "1.5"], "got 1.5"),
    (["--valid-pct", "nan"], "got nan"),
])
def test_bad_fractions_are_refused(flat, tmp_path, capsys, args, expected):
    assert main(["data", "split", str(flat), str(tmp_path / "split"), *args]) == 2
    assert expected in capsys.readouterr().err and not (tmp_path / "split").exists()


def test_folders_it_cannot_split_are_refused_before_anything_is_written(flat, tmp_path, capsys):
    def refused(src: Path, out: Path, expected: str, *more: str) -> None:
        assert main(["data", "split", str(src), str(out), *more]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and expected in err, err

    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "kept.txt").write_text("mine")
    refused(flat, tmp_path / "full", "expected a new or empty folder to write train/ and valid/ into, got one with files in it")
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["kept.txt"]
    refused(flat, flat / "split", f"expected a folder outside {flat}")
    refused(tmp_path / "demo", tmp_path / "split", "holds a train/ folder: expected class folders to split (to hold out "
            f"part of train/, split {tmp_path / 'demo' / 'train'})")
    refused(tmp_path / "nope", tmp_path / "split", "data folder not found")
    for f in (flat / "vertical").glob("*.jpg"):
        f.unlink()
    (flat / "vertical" / "only.jpg").write_bytes(b"one")
    refused(flat, tmp_path / "split", "class folder " + str(flat / "vertical") + ": expected at least 2 images to hold one out, got 1")
    (flat / "vertical" / "copy.jpg").write_bytes(b"one")  # two files, one image: a copy on each side would leak
    refused(flat, tmp_path / "split", "class 'vertical': expected at least 2 different images to hold one out, got 2 files "
            "of the same bytes")
    (flat / "vertical" / "copy.jpg").unlink()
    (flat / "empty").mkdir()
    refused(flat, tmp_path / "split", f"class folder has no images: {flat / 'empty'}")
    (flat / "empty").rmdir()
    refused(flat / "horizontal", tmp_path / "split", "expected at least 2 class folders in "
            f"{flat / 'horizontal'} (<class>/*.jpg), got 0; images with a table of their classes: give it with --classes-csv "
            "(multi-label tags: --labels-csv)")
    assert not (tmp_path / "split").exists() and not list(tmp_path.glob(".split.*"))


def test_train_names_the_split_command_where_a_split_is_missing(flat, tmp_path, capsys):
    assert main(["train", "--data", str(flat), "--run", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err.strip().endswith(f"; to split class folders into train/ and valid/: clfpipe data split {flat} NEW_FOLDER")
    shutil.rmtree(tmp_path / "demo" / "valid")
    assert main(["train", "--data", str(tmp_path / "demo"), "--run", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err.strip().endswith(f"; to hold out part of train/ for it: clfpipe data split {tmp_path / 'demo' / 'train'} NEW_FOLDER")
    assert not (tmp_path / "run").exists()
    tagged = tmp_path / "tagged"
    write_demo_multilabel(tmp_path / "ml", seed=0)
    shutil.copytree(tmp_path / "ml" / "train", tagged)
    shutil.copy(tmp_path / "ml" / "labels.csv", tagged)
    assert main(["train", "--data", str(tagged), "--run", str(tmp_path / "run"), "--set", "data.labels_csv=labels.csv"]) == 2
    assert capsys.readouterr().err.strip().endswith(
        f"; to split tagged images into train/ and valid/: clfpipe data split {tagged} NEW_FOLDER --labels-csv {tagged / 'labels.csv'}")


NAMES = st.text(string.ascii_letters + string.digits + "._- é猫", min_size=1, max_size=12).filter(lambda s: s not in (".", ".."))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tree=st.dictionaries(NAMES, st.lists(st.tuples(NAMES, st.sampled_from([".jpg", ".jpg", ".jpg", ".PNG", ".txt", ""])),
                                            min_size=1, max_size=6), min_size=2, max_size=4),
       loose=st.integers(0, 2),
       copies=st.lists(st.tuples(st.integers(0, 30), st.integers(0, 30)), max_size=4),
       pct=st.floats(0.01, 0.99),
       seed=st.integers(0, 2**32 - 1))
def test_any_folder_is_split_whole_or_refused_in_one_error(tmp_path_factory, tree, loose, copies, pct, seed):
    root = tmp_path_factory.mktemp("prop")
    src = root / "src"
    src.mkdir()
    written = []
    for folder, files in tree.items():
        (src / folder).mkdir(exist_ok=True)
        for stem, suffix in files:
            written.append(src / folder / f"{stem}{suffix}")
            written[-1].write_bytes(f"{folder}/{stem}{suffix}".encode())
    for i, j in copies:  # some files with another's bytes, in its class or another
        written[i % len(written)].write_bytes(written[j % len(written)].read_bytes())
    for i in range(loose):
        (src / f"loose{i}.jpg").write_bytes(b"x")
    try:
        result = split_dataset(src, root / "out", pct, seed)
    except DataError as exc:
        event(str(exc).split(":")[0][:30])
        assert not (root / "out").exists() and [p.name for p in root.iterdir()] == ["src"]
        return
    event("split")
    assert 0 < pct < 1 and not math.isnan(pct)
    classes = [p.name for p in sorted(src.iterdir()) if p.is_dir() and not p.name.startswith(".")]
    assert all(image_files(src / c) for c in classes)
    assert result.classes == len(classes) and result.outside == loose
    assert result.train + result.valid == sum(len(image_files(src / c)) for c in classes)
    train = scan_split(root / "out", "train", verify=False)
    assert train.classes == tuple(classes) and len(train) == result.train
    assert len(scan_split(root / "out", "valid", train.classes, verify=False)) == result.valid
    for c in classes:  # the files of a class with one content went to one split
        split_of: dict[bytes, set[str]] = {}
        for f in image_files(src / c):
            where = [s for s in ("train", "valid") if (root / "out" / s / f.relative_to(src)).is_file()]
            split_of.setdefault(f.read_bytes(), set()).update(where)
        assert all(len(splits) == 1 for splits in split_of.values())


def _flatten(demo: Path, dest: Path) -> Path:
    """The demo's train split as Kaggle's dog breeds ships: DEST/train/<id>.jpg and DEST/labels.csv
    (id without the suffix, breed)."""
    (dest / "train").mkdir(parents=True)
    rows = ["id,breed"]
    for i, f in enumerate(sorted((demo / "train").glob("*/*.jpg"))):
        image_id = f"{(i * 2654435761) % 2**32:08x}"
        shutil.copy(f, dest / "train" / f"{image_id}.jpg")
        rows.append(f"{image_id},{f.parent.name} breed")
    (dest / "labels.csv").write_text("\n".join(rows) + "\n")
    return dest


def test_images_named_in_a_classes_table_are_split_into_class_folders(tmp_path, capsys):
    demo = tmp_path / "demo"
    write_demo_dataset(demo, spec=DemoSpec(train_per_class=10, valid_per_class=1, image_size=32))
    dogs = _flatten(demo, tmp_path / "dogs")
    assert main(["train", "--data", str(dogs), "--run", str(tmp_path / "run")]) == 2  # what train says of this layout
    assert capsys.readouterr().err.strip().endswith(
        f"labels.csv is there: to put each image in its class's folder and hold out a valid/: clfpipe data split "
        f"{dogs / 'train'} NEW_FOLDER --classes-csv {dogs / 'labels.csv'}")
    out = tmp_path / "split"
    assert main(["data", "split", str(dogs / "train"), str(out), "--labels-csv", str(dogs / "labels.csv")]) == 2  # read as tags
    assert capsys.readouterr().err.strip() == (
        f"clfpipe: error: {dogs / 'labels.csv'}: expected columns image,tags, got ['id', 'breed'] (a table of one class per "
        "image is read by 'clfpipe data split SRC NEW_FOLDER --classes-csv FILE' into class folders)")
    before = {p: p.read_bytes() for p in dogs.rglob("*") if p.is_file()}
    assert main(["data", "split", str(dogs / "train"), str(out), "--classes-csv", str(dogs / "labels.csv"), "--valid-pct", "0.3"]) == 0
    assert capsys.readouterr().out.strip() == f"wrote 21 train and 9 valid images of 3 classes to {out} (hard links)"
    train = scan_split(out, "train")
    valid = scan_split(out, "valid", train.classes)
    assert train.classes == ("checker breed", "horizontal breed", "vertical breed")
    assert [np.bincount(s.labels).tolist() for s in (train, valid)] == [[7, 7, 7], [3, 3, 3]]
    table = dict(line.split(",") for line in (dogs / "labels.csv").read_text().splitlines()[1:])
    for split in (train, valid):  # each image in the folder of the class its row names, linked to the source
        for f, label in zip(split.files, split.labels):
            assert table[f.stem] == split.classes[label] and f.samefile(dogs / "train" / f.name)
    assert {p: p.read_bytes() for p in dogs.rglob("*") if p.is_file()} == before


def test_a_classes_table_it_cannot_split_by_is_refused_before_anything_is_written(tmp_path, capsys):
    demo = tmp_path / "demo"
    write_demo_dataset(demo, spec=DemoSpec(train_per_class=3, valid_per_class=1, image_size=32))
    dogs = _flatten(demo, tmp_path / "dogs")
    table = dogs / "labels.csv"
    rows = table.read_text().splitlines()

    def refused(lines: list[str], expected: str) -> None:
        table.write_text("\n".join(lines) + "\n")
        assert main(["data", "split", str(dogs / "train"), str(tmp_path / "out"), "--classes-csv", str(table)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err == f"clfpipe: error: {expected}", err
        assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))

    stem = rows[1].split(",")[0]
    refused(rows[:1] + [f"{stem},../up"] + rows[2:], f"{table} line 2: class '../up' cannot be a folder's name: "
            "expected no '/', '\\' or control character, and not '.' or '..'")
    refused(rows[:1] + [f"{stem},.hidden"] + rows[2:], f"{table} line 2: class '.hidden' would be a hidden folder, "
            "which no command reads: expected a name not starting with '.'")
    refused(rows + [f"{stem}.jpg,other"], f"{table} line {len(rows) + 1}: expected each image once, got '{stem}.jpg' again "
            "with another class ('other', before 'checker breed')")
    refused(rows[:1] + [f"{stem},"] + rows[2:], f"{table} line 2: expected an image name and its class, got ['{stem}', '']")
    refused(rows[:-1], f"labels.csv has no class for 1 image(s) in {dogs / 'train'}, e.g. {rows[-1].split(',')[0]}.jpg")
    refused(rows[:1] + [r.split(",")[0] + ",one" for r in rows[1:]],
            "expected at least 2 classes to split, got 1: labels.csv names ['one']")
    refused([rows[0]] + [rows[1]] + [r.split(",")[0] + ",other" for r in rows[2:]],
            "class 'checker breed': expected at least 2 images to hold one out, got 1")
    refused(["id"], f"{table}: expected a header row of at least two columns (image, class), got line 1 with fewer")


@settings(max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(st.binary(max_size=300),
                 st.lists(st.lists(st.text(max_size=8), max_size=3), max_size=6).map(
                     lambda rows: "\n".join(",".join(r) for r in [["id", "breed"], *rows]).encode("utf-8", "surrogatepass"))))
def test_any_classes_file_reads_as_classes_or_one_dataerror(read_table, content):
    from clfpipe.contract.dataset import class_name_problem, read_classes

    for stem, name in (read_table(read_classes, content) or {}).items():
        assert stem and name and class_name_problem(name) is None and "/" not in name


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(stems=st.lists(st.text(string.ascii_letters + string.digits + "_-", min_size=1, max_size=8), min_size=3, max_size=12,
                      unique=True),
       classes=st.lists(st.one_of(NAMES.filter(lambda n: not n.startswith(".")), NAMES,
                                  st.sampled_from(["a/b", "..", ".x", "", " c ", "x\ty"])), min_size=2, max_size=3, unique=True),
       picks=st.lists(st.integers(0, 10), min_size=12, max_size=12), unlisted=st.sampled_from([0, 0, 0, 1]),
       pct=st.floats(0.01, 0.99), seed=st.integers(0, 2**32 - 1))
def test_any_folder_and_classes_table_is_split_whole_or_refused_in_one_error(tmp_path_factory, stems, classes, picks, unlisted,
                                                                              pct, seed):
    root = tmp_path_factory.mktemp("table")
    src = root / "src"
    src.mkdir()
    for stem in stems:
        (src / f"{stem}.jpg").write_bytes(stem.encode())
    rows = [(stem, classes[pick % len(classes)]) for stem, pick in zip(stems[unlisted:], picks)]
    (root / "labels.csv").write_text("id,breed\n" + "".join(f"{s},{c}\n" for s, c in rows))
    try:
        result = split_dataset(src, root / "out", pct, seed, classes_csv=root / "labels.csv")
    except DataError as exc:
        event(str(exc).removeprefix(str(root / "labels.csv")).split(":")[0][:30])
        assert "\n" not in str(exc) and sorted(p.name for p in root.iterdir()) == ["labels.csv", "src"]
        return
    event("split")
    named = {stem: c.strip() for stem, c in rows}
    assert set(named) == set(stems) and result.train + result.valid == len(stems) and result.classes == len(set(named.values()))
    for split in ("train", "valid"):
        for f in image_files(root / "out" / split):
            assert f.parent.name == named[f.stem] and f.parent.parent == root / "out" / split


@pytest.fixture
def alike(tmp_path):
    """Two classes of 8 distinct images; three near copies of cat/0 and one of cat/1 and dog/0."""
    src = tmp_path / "alike"
    for c, name in enumerate(("cat", "dog")):
        (src / name).mkdir(parents=True)
        for i in range(8):
            detailed_image(10 * c + i, 120).save(src / name / f"{i}.jpg", quality=90)
    for copy, (source, scale, quality) in {"cat/0_small.jpg": ("cat/0.jpg", 0.6, 70), "cat/0_big.jpg": ("cat/0.jpg", 1.4, 95),
                                           "cat/0_low.jpg": ("cat/0.jpg", 1.0, 40), "cat/1_small.jpg": ("cat/1.jpg", 0.5, 80),
                                           "dog/0_again.jpg": ("dog/0.jpg", 1.0, 50)}.items():
        img = Image.open(src / source)
        img.resize((round(img.width * scale), round(img.height * scale)), Image.BILINEAR).save(src / copy, quality=quality)
    return src


GROUPS = [("cat/0.jpg", "cat/0_small.jpg", "cat/0_big.jpg", "cat/0_low.jpg"), ("cat/1.jpg", "cat/1_small.jpg"),
          ("dog/0.jpg", "dog/0_again.jpg")]


def _split_of(out: Path, name: str) -> str:
    (split,) = [s for s in ("train", "valid") if (out / s / name).is_file()]
    return split


def test_near_copies_of_a_class_are_held_out_together_when_asked(alike, tmp_path, capsys):
    apart = []
    for seed in range(6):
        out, plain = tmp_path / f"near{seed}", tmp_path / f"plain{seed}"
        assert main(["-q", "data", "split", str(alike), str(out), "--valid-pct", "0.3", "--seed", str(seed), "--near-copies"]) == 0
        assert all(len({_split_of(out, f) for f in group}) == 1 for group in GROUPS)
        assert len(image_files(out)) == len(image_files(alike))
        split_dataset(alike, plain, 0.3, seed)
        apart.append(any(len({_split_of(plain, f) for f in group}) == 2 for group in GROUPS))
    assert any(apart)  # without the option, some seed put a copy on each side


def test_a_folder_without_near_copies_splits_as_it_does_without_the_option(flat, tmp_path):
    split_dataset(flat, tmp_path / "plain", 0.3, seed=3)
    split_dataset(flat, tmp_path / "near", 0.3, seed=3, near_bits=NEAR_BITS)
    assert ({p.relative_to(tmp_path / "near") for p in image_files(tmp_path / "near")}
            == {p.relative_to(tmp_path / "plain") for p in image_files(tmp_path / "plain")})


def test_a_class_of_one_image_and_its_near_copies_is_refused(alike, tmp_path, capsys):
    for f in (alike / "cat").iterdir():
        if not f.name.startswith("0"):
            f.unlink()
    assert main(["data", "split", str(alike), str(tmp_path / "out"), "--near-copies"]) == 2
    assert capsys.readouterr().err.strip() == ("clfpipe: error: class 'cat': expected at least 2 different images to hold one "
                                               "out, got 4 copies or near copies of one image")
    assert main(["data", "split", str(alike), str(tmp_path / "out"), "--near-copies", "129"]) == 2
    assert "--near-copies: expected 0 to 128 bits of 256, got 129" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
