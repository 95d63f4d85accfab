"""`clfpipe data clean`: every image of a run's data ranked by its loss into a table the user edits
(fastai's top losses and ImageClassifierCleaner), and ``--apply`` carrying the edits out: deleted
images moved aside, relabelled ones moved into their class's folder, every row checked first."""

from __future__ import annotations

import csv
import io
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from clfpipe.cli import main
from clfpipe.contract.cleaning import COLUMNS, Plan, apply_plan, binary_cross_entropy, cross_entropy, rank, read_plan, table_bytes
from clfpipe.contract.dataset import image_files, read_tags, write_tags
from clfpipe.contract.errors import DataError
from clfpipe.demo_data import LABELS_CSV, DemoSpec, write_demo_dataset, write_demo_multilabel
from clfpipe.pipeline import Reference

CLASSES = ("checker", "horizontal", "vertical")


def _softmax_loss(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    return -np.log(p[np.arange(len(p)), labels])


@settings(max_examples=200, deadline=None)
@given(arrays(np.float32, st.tuples(st.integers(1, 6), st.integers(2, 5)), elements=st.floats(-30, 30, width=32)),
       st.data())
def test_cross_entropy_is_minus_log_softmax_of_the_label(logits, data):
    labels = np.array(data.draw(st.lists(st.integers(0, logits.shape[1] - 1), min_size=len(logits), max_size=len(logits))))
    np.testing.assert_allclose(cross_entropy(logits, labels), _softmax_loss(logits.astype(np.float64), labels),
                               rtol=1e-9, atol=1e-9)


def test_cross_entropy_stays_finite_where_the_probability_underflows():
    # softmax gives p(label) = 0 in float32 here: -log would be inf for both, and they would rank as equals
    loss = cross_entropy(np.array([[1000.0, -1000.0], [500.0, -500.0]], dtype=np.float32), np.array([1, 1]))
    np.testing.assert_allclose(loss, [2000.0, 1000.0])


@settings(max_examples=200, deadline=None)
@given(arrays(np.float32, st.tuples(st.integers(1, 6), st.integers(1, 5)), elements=st.floats(-15, 15, width=32)),
       st.data())
def test_binary_cross_entropy_is_the_mean_minus_log_p_of_each_tag_as_labelled(logits, data):
    targets = data.draw(arrays(np.int64, logits.shape, elements=st.integers(0, 1)))
    p = 1 / (1 + np.exp(-logits.astype(np.float64)))
    expected = -np.mean(np.log(np.where(targets == 1, p, 1 - p)), axis=1)
    np.testing.assert_allclose(binary_cross_entropy(logits, targets), expected, rtol=1e-6, atol=1e-9)  # 1 - p: ~1e-9 at 15


@settings(max_examples=200, deadline=None)
@given(arrays(np.float32, st.tuples(st.integers(1, 4), st.integers(1, 6), st.integers(2, 5)), elements=st.floats(-30, 30, width=32)),
       st.data())
def test_over_tta_views_the_losses_are_those_of_the_mean_probability(logits, data):
    views, n, c = logits.shape
    labels = np.array(data.draw(st.lists(st.integers(0, c - 1), min_size=n, max_size=n)))
    z = logits.astype(np.float64)
    p = np.exp(z - z.max(-1, keepdims=True))
    p = (p / p.sum(-1, keepdims=True)).mean(0)
    np.testing.assert_allclose(cross_entropy(logits, labels), -np.log(p[np.arange(n), labels]), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(cross_entropy(logits[:1], labels), cross_entropy(logits[0], labels), rtol=1e-12)
    targets = (z[0] > 0).astype(np.int64)
    q = (1 / (1 + np.exp(-z))).mean(0)
    expected = -np.mean(np.log(np.where(targets == 1, q, 1 - q)), axis=1)
    np.testing.assert_allclose(binary_cross_entropy(logits, targets), expected, rtol=1e-6, atol=1e-9)
    rows = {r.file: r.predicted for r in rank([f"f{i}" for i in range(n)], ["valid"] * n, labels, logits, [f"c{j}" for j in range(c)])}
    top2 = np.sort(p, axis=1)[:, -2:]
    for i in np.flatnonzero(top2[:, 1] - top2[:, 0] > 1e-9):  # a tie's winner is rounding's to choose
        assert rows[f"f{i}"] == f"c{int(np.argmax(p[i]))}"


def test_over_tta_views_a_loss_stays_finite_where_every_view_s_probability_underflows():
    views = np.array([[[1000.0, -1000.0]], [[500.0, -500.0]]], dtype=np.float32)  # p(label 1): 0 in both views
    np.testing.assert_allclose(cross_entropy(views, np.array([1])), [1000.0 + np.log(2)])  # -log((e^-2000 + e^-1000) / 2)


def test_tagged_images_rank_by_their_tags_loss_and_predict_the_tags_above_the_threshold():
    logits = np.array([[4.0, -4.0], [-4.0, 4.0], [0.0, 0.0]])
    rows = rank(["a", "b", "c"], ["train"] * 3, np.array([[1, 0], [1, 0], [0, 1]]), logits, ("x", "y"), threshold=0.5)
    assert [(r.file, r.label, r.predicted) for r in rows] == [("b", "x", "y"), ("c", "y", "-"), ("a", "x", "x")]
    assert rows[1].loss == pytest.approx(np.log(2)) and rows[1].p_label == pytest.approx(0.5)


TAGS = ("disc", "horizontal", "vertical")


def test_a_multi_label_table_deletes_and_keeps_a_split_whole(tmp_path):
    data = tmp_path / "planet"
    write_demo_multilabel(data, train=3, valid=2, image_size=8)
    rows = [{"file": "valid/valid_0000.jpg", "action": "delete"}, {"file": "train/train_0001.jpg", "action": "keep"}]
    plan = read_plan(_table(tmp_path / "t.csv", rows), data, TAGS, LABELS_CSV)
    assert plan.delete == (data / "valid/valid_0000.jpg",) and plan.relabel == () and plan.retag == ()
    rows.append({"file": "valid/valid_0001.jpg", "action": "delete"})
    with pytest.raises(DataError, match="leaves .*valid without an image: expected each split to keep one"):
        read_plan(_table(tmp_path / "t.csv", rows), data, TAGS, LABELS_CSV)
    with pytest.raises(DataError, match=r"file: expected a path under train/ or valid/ \(no part"):
        read_plan(_table(tmp_path / "t.csv", [{"file": "valid_0000.jpg", "action": "delete"}]), data, ("disc",), LABELS_CSV)


@pytest.fixture
def planet(tmp_path):
    """Six tagged images, their tags written by hand: every tag on a training image."""
    data = tmp_path / "planet"
    write_demo_multilabel(data, train=4, valid=2, image_size=8)
    (data / LABELS_CSV).write_text("image,tags\ntrain_0000,disc\ntrain_0001,horizontal\ntrain_0002,disc vertical\n"
                                   "train_0003,horizontal\nvalid_0000,disc\nvalid_0001,vertical\n")
    return data


def test_a_multi_label_row_set_to_tags_rewrites_that_image_s_row_of_the_tags_table(planet, tmp_path):
    images = _tree(planet)
    rows = [{"file": "train/train_0000.jpg", "label": "disc", "action": "vertical disc"},
            {"file": "train/train_0001.jpg", "label": "horizontal", "action": "horizontal"},  # its tags: kept
            {"file": "valid/valid_0000.jpg", "label": "disc", "action": "-"},  # none
            {"file": "train/train_0003.jpg", "label": "horizontal", "action": "delete"}]
    plan = read_plan(_table(tmp_path / "t.csv", rows), planet, TAGS, LABELS_CSV)
    assert plan.retag == ((planet / "train/train_0000.jpg", ("disc", "vertical")), (planet / "valid/valid_0000.jpg", ()))
    assert len(apply_plan(plan, planet, tmp_path / "aside", dry_run=True)) == 1 and _tree(planet) == images
    apply_plan(plan, planet, tmp_path / "aside")
    assert (planet / LABELS_CSV).read_text() == ("image,tags\ntrain_0000,disc vertical\ntrain_0001,horizontal\n"
                                                 "train_0002,disc vertical\ntrain_0003,horizontal\nvalid_0000,\n"
                                                 "valid_0001,vertical\n")
    assert read_tags(planet / LABELS_CSV)["valid_0000"] == ()
    with pytest.raises(DataError, match="'train/train_0000.jpg': label 'disc', but its tags in labels.csv are 'disc vertical': "
                                        "expected the table 'clfpipe data clean' wrote for this data \\(applied already\\?\\)"):
        read_plan(_table(tmp_path / "t.csv", rows[:3]), planet, TAGS, LABELS_CSV)  # the same table, less the moved file


@pytest.mark.parametrize("actions, message", [
    ({"train/train_0000.jpg": "disc cloudy"}, "line 2: action: expected keep, delete or the image's tags, space-separated "
     "('-' for none), each one of the run's (disc, horizontal, vertical), got 'cloudy'"),
    ({"train/train_0000.jpg": "horizontal", "train/train_0002.jpg": "horizontal"},
     "leaves valid/valid_0000.jpg tagged 'disc', a tag of no training image: expected every tag of a validation image"),
    ({"train/train_0002.jpg": "delete"}, "leaves valid/valid_0001.jpg tagged 'vertical', a tag of no training image"),
])
def test_a_multi_label_table_that_cannot_be_carried_out_is_refused_whole(planet, tmp_path, actions, message):
    before = _tree(planet)
    tags = read_tags(planet / LABELS_CSV)
    rows = [{"file": f, "label": " ".join(tags[Path(f).stem]), "action": a} for f, a in actions.items()]
    with pytest.raises(DataError) as info:
        read_plan(_table(tmp_path / "t.csv", rows), planet, TAGS, LABELS_CSV)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert _tree(planet) == before


def test_an_image_sharing_its_tags_row_with_another_is_not_retagged(planet, tmp_path):
    # the table is keyed by stem: valid/train_0000.png would take train_0000's new tags too
    (planet / "valid" / "train_0000.png").write_bytes((planet / "train/train_0000.jpg").read_bytes())
    rows = [{"file": "train/train_0000.jpg", "label": "disc", "action": "disc horizontal"}]
    with pytest.raises(DataError, match="its row of labels.csv \\('train_0000'\\) names another image of the data too"):
        read_plan(_table(tmp_path / "t.csv", rows), planet, TAGS, LABELS_CSV)


def test_the_tags_table_is_rewritten_as_it_was_but_the_edited_rows(tmp_path):
    table = tmp_path / "labels.csv"
    original = ('\ufeffimage,note,tags\r\na.jpg,"x, y",disc\r\n\r\n"b","two\nlines","horizontal vertical"\r\n'
                '"c","say ""hi""",""\n"d",,"disc"')  # quoted as no writer here would, the last line without an end
    table.write_bytes(original.encode("utf-8"))
    table.chmod(0o640)
    write_tags(table, {"b": ("vertical",), "d": (), "zz": ("disc",)})
    expected = original.replace('"b","two\nlines","horizontal vertical"', 'b,"two\nlines",vertical').replace('"d",,"disc"', "d,,")
    assert table.read_bytes() == expected.encode("utf-8")  # the other lines byte for byte
    assert table.stat().st_mode & 0o777 == 0o640 and [p.name for p in tmp_path.iterdir()] == ["labels.csv"]
    assert read_tags(table) == {"a": ("disc",), "b": ("vertical",), "c": (), "d": ()}


@settings(max_examples=150, deadline=None)
@given(st.one_of(st.binary(max_size=200), st.lists(st.tuples(st.sampled_from(["a", "b.jpg", "", "c"]), st.text(max_size=12)),
                                                    max_size=5).map(lambda rows: "image,tags\n" + "".join(
                                                        f'{i},"{t.replace(chr(34), "")}"\n' for i, t in rows)).map(str.encode)),
       st.dictionaries(st.sampled_from(["a", "b", "z"]), st.lists(st.sampled_from(TAGS), max_size=2).map(tuple), max_size=2))
def test_any_tags_table_is_rewritten_to_read_back_with_the_new_tags_or_refused_in_one_line(content, new):
    with tempfile.TemporaryDirectory() as tmp:
        table = Path(tmp) / "labels.csv"
        table.write_bytes(content)
        try:
            before = read_tags(table)
        except DataError:
            before = None
        try:
            write_tags(table, new)
        except DataError as exc:
            assert str(exc) and "\n" not in str(exc) and table.read_bytes() == content
            event("refused")
            return
        event("read by training" if before is not None else "rewritten, unread by training")
        if before is not None:  # a table training reads still reads, with the new tags where it has the images
            assert read_tags(table) == {**before, **{k: v for k, v in new.items() if k in before}}


def test_rank_is_highest_loss_first_and_stable_on_ties():
    logits = np.array([[0.0, 0.0], [3.0, 0.0], [0.0, 0.0], [0.0, 3.0]])
    rows = rank(["a", "b", "c", "d"], ["train"] * 4, np.array([0, 1, 1, 1]), logits, ("x", "y"))
    assert [r.file for r in rows] == ["b", "a", "c", "d"]  # a and c tie at log 2: file order
    assert [r.predicted for r in rows] == ["x", "x", "x", "y"]
    assert rows[0].label == "y" and rows[0].p_label == pytest.approx(1 / (1 + np.exp(3)))


@pytest.fixture
def data(tmp_path):
    root = tmp_path / "data"
    write_demo_dataset(root, spec=DemoSpec(train_per_class=3, valid_per_class=2, image_size=16))
    return root


def _table(path: Path, rows: list[dict], columns=COLUMNS) -> Path:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    path.write_text(buf.getvalue())
    return path


def _rows(data: Path, actions: dict[str, str]) -> list[dict]:
    """Every image of data as a row, with `actions` by file (else keep)."""
    files = [f.relative_to(data).as_posix() for f in image_files(data)]
    return [{"file": f, "label": f.split("/")[1], "action": actions.get(f, "keep")} for f in files]


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_the_written_table_read_back_unchanged_moves_nothing(data, tmp_path):
    files = [f.relative_to(data).as_posix() for f in image_files(data)]
    rows = rank(files, [f.split("/")[0] for f in files], np.array([CLASSES.index(f.split("/")[1]) for f in files]),
                np.random.default_rng(0).normal(size=(len(files), 3)), CLASSES)
    (tmp_path / "t.csv").write_bytes(table_bytes(rows))
    assert len(read_plan(tmp_path / "t.csv", data, CLASSES)) == 0


def test_apply_moves_deleted_images_aside_and_relabelled_ones_into_their_class(data, tmp_path):
    before = _tree(data)
    table = _table(tmp_path / "t.csv", _rows(data, {"train/checker/checker_0000.jpg": "delete",
                                                      "train/vertical/vertical_0001.jpg": "horizontal",
                                                      "valid/horizontal/horizontal_0000.jpg": "horizontal"}))  # its own: kept
    plan = read_plan(table, data, CLASSES)
    aside = tmp_path / "aside"
    moves = apply_plan(plan, data, aside)
    assert moves == [(data / "train/checker/checker_0000.jpg", aside / "train/checker/checker_0000.jpg"),
                     (data / "train/vertical/vertical_0001.jpg", data / "train/horizontal/vertical_0001.jpg")]
    after = {**_tree(data), **{f"aside/{k}": v for k, v in _tree(aside).items()}}
    expected = dict(before)
    expected["aside/train/checker/checker_0000.jpg"] = expected.pop("train/checker/checker_0000.jpg")
    expected["train/horizontal/vertical_0001.jpg"] = expected.pop("train/vertical/vertical_0001.jpg")
    assert after == expected


def test_a_dry_run_moves_nothing(data, tmp_path):
    before = _tree(data)
    plan = read_plan(_table(tmp_path / "t.csv", _rows(data, {"train/checker/checker_0000.jpg": "delete"})), data, CLASSES)
    assert len(apply_plan(plan, data, tmp_path / "aside", dry_run=True)) == 1
    assert _tree(data) == before and not (tmp_path / "aside").exists()


REFUSED = [
    ({"train/checker/checker_0000.jpg": "Delete"}, "line 2: action: expected keep, delete or one of the run's classes "
     "(checker, horizontal, vertical), got 'Delete'"),
    ({"valid/vertical/vertical_0000.jpg": "delete", "valid/vertical/vertical_0001.jpg": "checker"},
     "the table leaves {data}/valid/vertical without an image: expected every class to keep one in each split"),
]


@pytest.mark.parametrize("actions, message", REFUSED)
def test_a_table_that_cannot_be_carried_out_is_refused_whole(data, tmp_path, actions, message):
    before = _tree(data)
    with pytest.raises(DataError) as info:
        read_plan(_table(tmp_path / "t.csv", _rows(data, actions)), data, CLASSES)
    assert message.format(data=data) in str(info.value)
    assert _tree(data) == before


@pytest.mark.parametrize("row, message", [
    ({"file": "../data/train/checker/checker_0000.jpg"}, "file: expected a path under train/<class>/ or valid/<class>/ "
                                                          "(no part starting with '.'), got '../data/train/checker/checker_0000.jpg'"),
    ({"file": "train/checker/._checker_0000.jpg"}, "(no part starting with '.'), got 'train/checker/._checker_0000.jpg'"),
    ({"file": "/etc/passwd.jpg"}, "file: expected a path under train/<class>/ or valid/<class>/"),
    ({"file": "train/dog/a.jpg"}, "'train/dog/a.jpg': expected a folder of one of the run's classes (checker, "
                                  "horizontal, vertical), got 'dog'"),
    ({"file": "train/checker/notes.txt"}, "'train/checker/notes.txt': expected an image (.jpg"),
    ({"file": "train/checker/checker_0000.jpg", "label": "vertical"},
     "label 'vertical', but the file is in 'checker''s folder"),
    ({"file": "train/checker/gone.jpg", "action": "delete"}, "'train/checker/gone.jpg': expected a file in"),
    ({"file": "train/checker/checker_0001.jpg", "action": "delete"}, "expected each file once, got "
                                                                     "'train/checker/checker_0001.jpg' again"),
])
def test_each_bad_row_is_one_line_naming_it(data, tmp_path, row, message):
    rows = [{"file": "train/checker/checker_0001.jpg", "action": "keep"}, row]
    with pytest.raises(DataError) as info:
        read_plan(_table(tmp_path / "t.csv", rows), data, CLASSES)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_two_files_relabelled_onto_one_name_or_onto_a_file_are_refused(data, tmp_path):
    image = (data / "train/checker/checker_0000.jpg").read_bytes()
    for folder in ("checker", "horizontal", "vertical"):
        (data / "train" / folder / "dup.jpg").write_bytes(image)
    with pytest.raises(DataError, match="relabelling would move a file onto .*train/horizontal/dup.jpg: expected a name free"):
        read_plan(_table(tmp_path / "t.csv", _rows(data, {"train/checker/dup.jpg": "horizontal"})), data, CLASSES)
    (data / "train/checker/dup.jpg").unlink()
    with pytest.raises(DataError, match="relabelling would move two files onto .*train/checker/dup.jpg"):
        read_plan(_table(tmp_path / "t.csv", _rows(data, {"train/vertical/dup.jpg": "checker",
                                                           "train/horizontal/dup.jpg": "checker"})), data, CLASSES)


def test_deleted_images_go_outside_the_splits(data, tmp_path):
    plan = read_plan(_table(tmp_path / "t.csv", _rows(data, {"train/checker/checker_0000.jpg": "delete"})), data, CLASSES)
    with pytest.raises(DataError, match="--move-to: expected a folder outside"):
        apply_plan(plan, data, data / "train" / "removed")
    assert (data / "train/checker/checker_0000.jpg").is_file()


REAL = [f"{split}/{c}/{c}_{i:04d}.jpg" for split, n in (("train", 3), ("valid", 2)) for c in CLASSES for i in range(n)]
JUNK = ["train/checker/missing.jpg", "train/dog/a.jpg", "valid/checker/../x.jpg", "", "train", "/train/checker/a.jpg"]
ACTIONS = ["keep", "delete", "", *CLASSES]
GOOD = st.fixed_dictionaries({"file": st.sampled_from(REAL), "label": st.sampled_from(["=", ""]),  # '=': the file's class
                              "action": st.sampled_from(ACTIONS)})
ANY = st.fixed_dictionaries({
    "file": st.one_of(st.sampled_from(REAL), st.sampled_from(JUNK), st.text(max_size=20)),
    "label": st.one_of(st.just("="), st.sampled_from(CLASSES), st.text(max_size=5)),
    "action": st.one_of(st.sampled_from(ACTIONS), st.text(max_size=8)),
})
# rows a user may write, and at most one that may be anything: one bad row refuses the whole table
TABLES = st.tuples(st.lists(GOOD, max_size=10, unique_by=lambda r: r["file"]), st.lists(ANY, max_size=1))


TAGGED = [f"{split}/{split}_{i:04d}.jpg" for split, n in (("train", 3), ("valid", 2)) for i in range(n)]
TAG_LISTS = st.lists(st.sampled_from([*TAGS, "-"]), max_size=3).map(" ".join)
TAGGED_ROW = st.fixed_dictionaries({"file": st.sampled_from(TAGGED), "label": st.sampled_from(["=", "=", "=", "", "disc"]),
                                    "action": st.one_of(st.sampled_from(["keep", "delete", ""]), TAG_LISTS)})
# at most one row that may be anything, in a third of the tables
TAGGED_TABLES = st.tuples(st.lists(TAGGED_ROW, max_size=5, unique_by=lambda r: r["file"]),
                          st.sampled_from([0, 0, 1]).flatmap(lambda n: st.lists(ANY, min_size=n, max_size=n)))


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.binary(max_size=300), TABLES.map(lambda rows: _csv_bytes(rows[0] + rows[1]))))
def test_any_table_is_carried_out_whole_or_refused_in_one_line(content):
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        write_demo_dataset(data, spec=DemoSpec(train_per_class=3, valid_per_class=2, image_size=8))
        _carried_out_or_refused(data, content)
        for split in ("train", "valid"):
            assert all(image_files(data / split / c) for c in CLASSES)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.binary(max_size=300), TAGGED_TABLES))
def test_any_table_of_a_multi_label_run_is_carried_out_whole_or_refused_in_one_line(content):
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        write_demo_multilabel(data, train=3, valid=2, image_size=8)
        tags = read_tags(data / LABELS_CSV)
        if not isinstance(content, bytes):  # rows: '=' is the image's tags now
            content = _csv_bytes([{**r, "label": " ".join(tags.get(Path(r["file"]).stem, ())) if r["label"] == "=" else r["label"]}
                                  for r in content[0] + content[1]])
        plan = _carried_out_or_refused(data, content, LABELS_CSV)
        assert image_files(data / "train") and image_files(data / "valid")
        new = {file.stem: retagged for file, retagged in plan.retag} if plan else {}
        assert read_tags(data / LABELS_CSV) == {**tags, **new}  # the edited rows, and no other, changed
        trained = {t for f in image_files(data / "train") for t in read_tags(data / LABELS_CSV)[f.stem]}
        assert all(set(read_tags(data / LABELS_CSV)[f.stem]) <= trained for f in image_files(data / "valid"))


def _carried_out_or_refused(data: Path, content: bytes, labels_csv: str = "") -> Plan | None:
    """The table read and carried out, every image then somewhere once; or one DataError, nothing
    changed (None)."""
    before = _tree(data)
    (data.parent / "t.csv").write_bytes(content)
    try:
        plan = read_plan(data.parent / "t.csv", data, TAGS if labels_csv else CLASSES, labels_csv)
    except DataError as exc:
        assert str(exc) and "\n" not in str(exc)
        assert _tree(data) == before
        event("refused")
        return None
    event(f"{len(plan)} changes")
    moves = apply_plan(plan, data, data.parent / "aside")
    images = {k: v for k, v in before.items() if k != labels_csv}
    after = {k: v for k, v in _tree(data).items() if k != labels_csv}
    after.update({f"aside/{k}": v for k, v in _tree(data.parent / "aside").items()})
    assert sorted(after.values()) == sorted(images.values())  # every image somewhere, none lost or doubled
    for source, target in moves:
        assert not source.exists() and target.read_bytes() == before[source.relative_to(data).as_posix()]
    return plan


def _csv_bytes(rows: list[dict]) -> bytes:
    rows = [{**r, "label": r["file"].split("/")[1] if r["label"] == "=" and r["file"].count("/") > 1 else r["label"]}
            for r in rows]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["file", "label", "action"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue().encode("utf-8", "surrogatepass")


def _read(table: Path) -> list[dict]:
    return list(csv.DictReader(table.open(newline="")))


@pytest.mark.slow
def test_clean_ranks_mislabelled_images_first_and_apply_puts_them_back(trained_run, demo_data, tmp_path, capsys):
    assert f"<code>clfpipe data clean --run {trained_run}</code>" in (trained_run / "report" / "index.html").read_text()
    data = tmp_path / "data"
    shutil.copytree(demo_data, data)
    wrong = sorted((data / "train" / "horizontal").glob("*.jpg"))[:3]
    for f in wrong:  # three horizontal images filed as checker: the trained model knows better
        f.rename(data / "train" / "checker" / f.name)
    out = tmp_path / "clean"
    assert main(["data", "clean", "--run", str(trained_run), "--data", str(data), "--out", str(out), "--show", "12"]) == 0
    rows = _read(out / "cleaning.csv")
    assert list(rows[0]) == list(COLUMNS)
    assert sorted(r["file"] for r in rows) == sorted(f.relative_to(data).as_posix() for f in image_files(data))
    losses = [float(r["loss"]) for r in rows]
    assert losses == sorted(losses, reverse=True) and [int(r["rank"]) for r in rows] == list(range(1, len(rows) + 1))
    misfiled = {f"train/checker/{f.name}" for f in wrong}
    top = [r for r in rows[:9] if r["file"] in misfiled]  # the top 2% of 450: here they ranked 1, 2 and 5
    assert len(top) == 3 and all(r["predicted"] == "horizontal" and r["label"] == "checker" for r in top)
    # the probabilities are the run's, as the reference path that judges the server computes them
    valid = [r for r in rows if r["split"] == "valid"]
    ref = Reference(trained_run, [demo_data / r["file"] for r in valid]).on("pil")  # the same files, unmoved
    p = ref[np.arange(len(valid)), [CLASSES.index(r["label"]) for r in valid]]
    np.testing.assert_allclose([float(r["p_label"]) for r in valid], p, rtol=1e-3, atol=1e-6)
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["top_losses_1.png", "top_losses_11.png", "top_losses_6.png"]
    assert "clfpipe data clean --run" in (out / "index.html").read_text() and rows[0]["file"] in (out / "index.html").read_text()
    capsys.readouterr()

    for r in top:
        r["action"] = "horizontal"
    deleted = next(r["file"] for r in rows if r["file"] not in misfiled)
    rows[[r["file"] for r in rows].index(deleted)]["action"] = "delete"
    _table(out / "cleaning.csv", rows)
    assert main(["data", "clean", "--run", str(trained_run), "--data", str(data), "--apply", str(out / "cleaning.csv")]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 4 and printed[0] == f"{data / deleted}\t{data / 'removed' / deleted}"
    assert all((data / "train" / "horizontal" / f.name).is_file() for f in wrong)
    assert (data / "removed" / deleted).is_file() and not (data / deleted).exists()
    # the same table again: its files have moved, and it says so
    assert main(["data", "clean", "--run", str(trained_run), "--data", str(data), "--apply", str(out / "cleaning.csv")]) == 2
    assert "expected a file in" in capsys.readouterr().err


@pytest.mark.slow
def test_clean_with_tta_ranks_by_the_tta_views_mean_probabilities(trained_run, demo_data, tmp_path):
    out = tmp_path / "clean"
    assert main(["data", "clean", "--run", str(trained_run), "--out", str(out), "--show", "5", "--tta"]) == 0
    rows = _read(out / "cleaning.csv")
    losses = [float(r["loss"]) for r in rows]
    assert len(rows) == 450 and losses == sorted(losses, reverse=True)
    valid = sorted((r for r in rows if r["split"] == "valid"), key=lambda r: r["file"])
    ref = Reference(trained_run, [demo_data / r["file"] for r in valid]).tta  # what the served TTA ensemble is judged by
    np.testing.assert_allclose([float(r["p_label"]) for r in valid],
                               ref[np.arange(len(valid)), [CLASSES.index(r["label"]) for r in valid]], rtol=1e-3, atol=1e-6)
    assert [r["predicted"] for r in valid] == [CLASSES[i] for i in ref.argmax(1)]
    assert "deterministic TTA views" in (out / "index.html").read_text()


@pytest.mark.slow
def test_clean_refuses_bad_options_before_any_work(trained_run, demo_data, tmp_path, capsys):
    keep = tmp_path / "mine"
    keep.mkdir()
    (keep / "notes.txt").write_text("not a table")
    for argv, message in [
        (["--show", "481"], "--show: expected 0 to 480 images, got 481"),
        (["--out", str(keep)], f"--out {keep}: expected a new folder or one 'clfpipe data clean' wrote (no cleaning.csv "
                               "there): it is left as it was"),
        (["--move-to", str(tmp_path / "x")], "data clean: --move-to and --dry-run go with --apply CSV"),
        (["--out", str(demo_data / "train" / "clean")], f"--out: expected a folder outside {demo_data.resolve() / 'train'}, "
                                                         f"got {demo_data / 'train' / 'clean'}"),  # its PNGs: a class
        (["--apply", str(tmp_path / "t.csv"), "--show", "3"], "data clean: --out, --show and --tta make the table: expected "
                                                             "none of them with --apply"),
    ]:
        assert main(["data", "clean", "--run", str(trained_run), *argv]) == 2
        assert capsys.readouterr().err == f"clfpipe: error: {message}\n"
    assert [p.name for p in keep.iterdir()] == ["notes.txt"] and not (trained_run / "clean").exists()
    assert not (demo_data / "train" / "clean").exists()


@pytest.mark.parametrize("delimiter, newline, bom", [(";", "\r\n", "\ufeff"), ("\t", "\n", ""), (",", "\r\n", "\ufeff")])
def test_a_table_saved_by_a_spreadsheet_reads_the_same(data, tmp_path, delimiter, newline, bom):
    rows = _rows(data, {"train/checker/checker_0000.jpg": "delete", "valid/vertical/vertical_0001.jpg": "checker"})
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["file", "label", "action"], delimiter=delimiter, lineterminator=newline,
                            quoting=csv.QUOTE_ALL)
    writer.writeheader()
    writer.writerows(rows)
    (tmp_path / "t.csv").write_text(bom + buf.getvalue(), newline="")
    plan = read_plan(tmp_path / "t.csv", data, CLASSES)
    assert plan.delete == (data / "train/checker/checker_0000.jpg",)
    assert plan.relabel == ((data / "valid/vertical/vertical_0001.jpg", data / "valid/checker/vertical_0001.jpg"),)
