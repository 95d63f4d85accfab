"""A user's data folder with files that are not usable images: `clfpipe data check` finds every
one (a whole decode, as training does) and can move them aside; `clfpipe train` refuses the ones
its header scan sees, all counted, before the run directory exists."""

from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image

from clfpipe.cli import main
from clfpipe.contract.dataset import check_data, image_problem
from clfpipe.contract.errors import DataError
from clfpipe.contract.preprocess import load_image
from clfpipe.contract.similar import HASH_BITS, MAX_NEAR_BITS, NEAR_BITS, near_groups, nearest_earlier
from clfpipe.demo_data import DemoSpec, detailed_image, write_demo_dataset, write_demo_multilabel


@pytest.fixture
def data(tmp_path):
    root = tmp_path / "data"
    write_demo_dataset(root, spec=DemoSpec(train_per_class=3, valid_per_class=2, image_size=32))
    return root


def _spoil(data):
    """Three unusable files (one only a whole decode finds), two that are not read, one outside the
    class folders, hidden ones (not counted) and an image in a class folder's subfolder (read)."""
    whole = next((data / "train" / "vertical").glob("*.jpg")).read_bytes()
    bad = {
        data / "train" / "vertical" / "cut.jpg": whole[: len(whole) // 2],
        data / "train" / "checker" / "long.png": _png(1000, 3),
        data / "valid" / "horizontal" / "text.jpg": b"not an image at all",
    }
    for path, content in bad.items():
        path.write_bytes(content)
    (data / "train" / "checker" / "notes.txt").write_text("not an image")
    (data / "train" / "checker" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (data / "valid" / "vertical" / "scan.tiff").write_bytes(b"II*\0")
    (data / "valid" / "vertical" / "more").mkdir()
    (data / "valid" / "vertical" / "more" / "nested.jpg").write_bytes(whole)
    (data / "train" / "loose.jpg").write_bytes(whole)
    (data / "train" / "checker" / "._resource.jpg").write_bytes(b"\0\5\26\7Mac OS X")  # macOS's copy of a resource fork
    (data / "train" / ".ipynb_checkpoints").mkdir()  # Jupyter's: no class
    (data / "train" / ".ipynb_checkpoints" / "copy.jpg").write_bytes(whole)
    return sorted(bad)


def _png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (10, 20, 30)).save(buf, format="PNG")
    return buf.getvalue()


def test_data_check_lists_every_unusable_file_and_moves_them_aside(data, tmp_path, capsys):
    bad = _spoil(data)
    nested = data / "valid" / "vertical" / "more" / "nested.jpg"
    first = next(p for p in sorted((data / "train" / "vertical").glob("*.jpg")) if p.read_bytes() == nested.read_bytes())
    leak = f"{nested}\tsame bytes as {first}: in both splits: the validation score counts an image training saw"
    assert main(["data", "check", str(data), "--workers", "2"]) == 2
    out, err = capsys.readouterr()
    listed = sorted(line.split("\t")[0] for line in out.splitlines())
    assert listed == sorted([str(p) for p in bad] + [str(nested)])
    assert "image file is truncated" in out and "image too elongated" in out and "not an image" in out
    assert out.splitlines()[-1] == leak  # a copy of a training image in valid/
    # hidden files and folders (.DS_Store, ._resource.jpg, .ipynb_checkpoints): not read, not counted
    assert "3 unusable, 1 repeating another's bytes; not read as images: 1 .jpg not in a class folder, 1 .tiff, 1 .txt" in err
    assert check_data(data).images == 3 * 3 + 3 * 2 + 3 + 1  # the demo's, the bad ones and more/nested.jpg

    inside = data / "train" / "rejected"
    assert main(["data", "check", str(data), "--move-to", str(inside)]) == 2  # would be read again there
    assert "expected a folder outside" in capsys.readouterr().err and all(p.exists() for p in bad)

    aside = tmp_path / "rejected"
    assert main(["data", "check", str(data), "--move-to", str(aside)]) == 2  # the copy stays: which one goes is the user's call
    assert not any(p.exists() for p in bad)
    assert sorted(aside.rglob("*.*")) == sorted(aside / p.relative_to(data) for p in bad)
    capsys.readouterr()
    assert main(["data", "check", str(data)]) == 2
    assert capsys.readouterr().out == leak + "\n"
    nested.unlink()
    assert main(["data", "check", str(data)]) == 0
    assert capsys.readouterr().out == ""

    again = data / "train" / "vertical" / "cut.jpg"  # the same name spoilt again: nothing is overwritten
    again.write_bytes(b"\xff\xd8\xff")
    assert main(["data", "check", str(data), "--move-to", str(aside)]) == 2
    assert "already exists" in capsys.readouterr().err and again.exists()


def test_data_check_names_each_file_that_repeats_another_and_what_the_copy_does(data, capsys):
    train = sorted((data / "train" / "checker").glob("*.jpg"))
    copies = {
        data / "train" / "checker" / "z_again.jpg": (train[1], "a second copy with the same label: trained on twice as often"),
        data / "train" / "vertical" / "z.jpg": (train[0], "labelled 'checker' there, 'vertical' here"),
        data / "valid" / "horizontal" / "z.jpg": (train[2], "labelled 'checker' there, 'horizontal' here; in both splits: "
                                                           "the validation score counts an image training saw"),
    }
    for copy, (source, _) in copies.items():
        copy.write_bytes(source.read_bytes())
    found = check_data(data)
    assert {d.path: (d.first, d.why) for d in found.duplicates} == copies and not found.unusable
    assert main(["data", "check", str(data)]) == 2
    assert sorted(capsys.readouterr().out.splitlines()) == sorted(f"{c}\tsame bytes as {s}: {why}" for c, (s, why) in copies.items())


def test_repeated_multi_label_images_are_named_by_their_tags(tmp_path):
    data = tmp_path / "planet"
    write_demo_multilabel(data, train=20, valid=4, image_size=16)
    first = sorted((data / "train").glob("*.jpg"))[0]
    copy = data / "valid" / "copy.jpg"
    copy.write_bytes(first.read_bytes())
    tags = dict(row.split(",", 1) for row in (data / "labels.csv").read_text().splitlines()[1:])
    with (data / "labels.csv").open("a") as fh:
        fh.write("copy,disc\n")
    (found,) = check_data(data, "labels.csv").duplicates
    assert (found.path, found.first) == (copy, first)
    assert found.why == (f"labelled {tags[first.stem]!r} there, 'disc' here; in both splits: the validation score counts "
                         "an image training saw")


def test_training_refuses_unusable_headers_all_counted_before_the_run_exists(data, tmp_path, capsys):
    _spoil(data)
    run = tmp_path / "run"
    assert main(["train", "--data", str(data), "--run", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    # the truncated file's header is whole: only the elongated one is seen in train/ (text.jpg is in valid/)
    assert err == (f"clfpipe: error: unusable image file {data / 'train' / 'checker' / 'long.png'}: image too "
                   "elongated: expected an aspect ratio of at most 16:1, got 1000x3")
    (data / "train" / "vertical" / "also.jpg").write_bytes(b"GIF89a")
    assert main(["train", "--data", str(data), "--run", str(run)]) == 2
    assert f"(1 more: 'clfpipe data check {data}' lists every one" in capsys.readouterr().err
    assert not run.exists()


def test_data_check_range_checks_its_workers_and_names_a_missing_folder(data, tmp_path):
    for workers in (0, 257):
        with pytest.raises(DataError, match=f"^--workers: expected 1 to 256, got {workers}$"):
            check_data(data, workers=workers)
    with pytest.raises(DataError, match="data folder not found"):
        check_data(tmp_path / "nope")


def _seed_image(fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


SEEDS = {fmt: _seed_image(fmt) for fmt in ("JPEG", "PNG", "BMP", "WEBP")}


@settings(max_examples=300, deadline=3000, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.one_of(st.binary(max_size=2000),
                 st.tuples(st.sampled_from(sorted(SEEDS)), st.lists(st.tuples(st.integers(0, 5000), st.integers(0, 255)), max_size=6),
                           st.integers(0, 3000)).map(lambda t: _mutated(*t))))
def test_any_file_is_usable_or_one_line_and_usable_means_training_decodes_it(tmp_path, content):
    path = tmp_path / "image.jpg"
    path.write_bytes(content)
    why = image_problem(path)
    if why is None:
        assert load_image(path).mode == "RGB"
    else:
        assert why and "\n" not in why


def _mutated(fmt: str, flips: list[tuple[int, int]], cut: int) -> bytes:
    data = bytearray(SEEDS[fmt])
    for position, value in flips:
        data[position % len(data)] = value
    return bytes(data[:cut])


def _reachable_images(folder):
    """The oracle: every non-hidden image file reachable from folder, following folder links, by
    resolved path (a breadth-first walk over real folders, each once)."""
    from pathlib import Path

    from clfpipe.contract.dataset import IMAGE_SUFFIXES

    seen, queue, found = set(), [Path(folder).resolve()], set()
    while queue:
        here = queue.pop()
        if here in seen:
            continue
        seen.add(here)
        for entry in here.iterdir():
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                queue.append(entry.resolve())
            elif entry.is_file() and entry.suffix.lower() in IMAGE_SUFFIXES:
                found.add(entry.resolve())
    return found


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(folders=st.lists(st.integers(0, 6), min_size=1, max_size=8),
       files=st.lists(st.tuples(st.integers(0, 8), st.sampled_from(["a.jpg", "b.PNG", ".c.jpg", "d.txt"])), max_size=12),
       links=st.lists(st.tuples(st.integers(0, 8), st.integers(0, 8), st.booleans()), max_size=5))
def test_any_tree_of_folders_and_links_is_walked_to_an_end_each_image_once(tmp_path_factory, folders, files, links):
    """Random trees with links between folders (up the tree too, so loops), dangling links and
    hidden names: the walk ends, stays under the folder, and lists each reachable image once."""
    from clfpipe.contract.dataset import image_files

    root = tmp_path_factory.mktemp("walk") / "class"
    dirs = [root, root.parent / "elsewhere"]  # links may lead out of the class folder, and back
    for d in dirs:
        d.mkdir()
    for parent in folders:  # each new folder under an earlier one
        dirs.append(dirs[min(parent, len(dirs) - 1)] / f"f{len(dirs)}")
        dirs[-1].mkdir()
    for where, name in files:
        (dirs[where % len(dirs)] / name).write_bytes(b"x")
    for i, (where, target, dangling) in enumerate(links):
        goal = dirs[target % len(dirs)] if not dangling else root.parent / "gone"
        (dirs[where % len(dirs)] / f"link{i}").symlink_to(goal, target_is_directory=True)
    found = image_files(root)
    assert all(str(f).startswith(str(root) + "/") and not f.name.startswith(".") for f in found)
    assert len(found) == len({f.resolve() for f in found})
    assert {f.resolve() for f in found} == _reachable_images(root)


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_nearest_earlier_is_each_hash_s_nearest_earlier_one_within_the_bound(data):
    n = data.draw(st.integers(0, 12))
    rows = data.draw(arrays(np.bool_, (n, HASH_BITS)))
    for j in range(1, n):  # a row may be an earlier one with some bits flipped: near it, or equally near two
        if data.draw(st.booleans()):
            source, count = data.draw(st.integers(0, j - 1)), data.draw(st.integers(0, 60))
            rows[j] = rows[source] ^ (np.arange(HASH_BITS) < count)
    max_bits = data.draw(st.integers(0, 128))
    expected = []
    for j in range(n):
        dist = [int((rows[i] != rows[j]).sum()) for i in range(j)]
        if dist and min(dist) <= max_bits:
            expected.append((j, dist.index(min(dist)), min(dist)))
    assert nearest_earlier(rows, max_bits) == expected


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_near_groups_are_the_components_of_the_pairs_within_the_bound(data):
    n = data.draw(st.integers(0, 12))
    rows = data.draw(arrays(np.bool_, (n, HASH_BITS)))
    for j in range(1, n):
        if data.draw(st.booleans()):
            rows[j] = rows[data.draw(st.integers(0, j - 1))] ^ (np.arange(HASH_BITS) < data.draw(st.integers(0, 60)))
    max_bits = data.draw(st.integers(0, 128))
    component = list(range(n))  # by relabelling until nothing changes: the closed form, slowly
    changed = True
    while changed:
        changed = False
        for i in range(n):
            for j in range(n):
                if int((rows[i] != rows[j]).sum()) <= max_bits and component[j] > component[i]:
                    component[j], changed = component[i], True
    expected = {}
    for i in range(n):
        expected.setdefault(component[i], []).append(i)
    assert near_groups(rows, max_bits) == list(expected.values())


def _saved(img: Image.Image, path, scale: float = 1.0, quality: int = 90) -> None:
    img.resize((round(img.width * scale), round(img.height * scale)), Image.BILINEAR).save(path, quality=quality)


def test_near_copies_are_named_with_what_they_do_and_distinct_images_are_not(tmp_path, capsys):
    data = tmp_path / "photos"
    for split, count in (("train", 6), ("valid", 3)):
        for c, name in enumerate(("cat", "dog")):
            (data / split / name).mkdir(parents=True)
            for i in range(count):
                _saved(detailed_image(100 * c + 10 * (split == "valid") + i, 160), data / split / name / f"{i}.jpg")
    first = data / "train" / "cat" / "0.jpg"
    near = {  # resized and saved again; one copied byte for byte (a copy, not a near copy)
        data / "valid" / "cat" / "small.jpg": (2 / 3, 70, "in both splits: the validation score counts an image training saw"),
        data / "train" / "dog" / "z.jpg": (1.0, 40, "labelled 'cat' there, 'dog' here"),
        data / "train" / "cat" / "z_big.jpg": (1.5, 95, "a second copy with the same label: trained on twice as often"),
    }
    for path, (scale, quality, _) in near.items():
        _saved(Image.open(first), path, scale, quality)
    (data / "valid" / "dog" / "same.jpg").write_bytes(first.read_bytes())
    found = check_data(data, near_bits=NEAR_BITS)
    assert {n.path: n.why for n in found.near} == {p: why for p, (_, _, why) in near.items()}
    assert all(n.first in {first, *near} and n.bits <= NEAR_BITS for n in found.near)  # the nearest of the image's copies
    assert [d.path for d in found.duplicates] == [data / "valid" / "dog" / "same.jpg"] and check_data(data).near is None
    assert main(["data", "check", str(data), "--near-copies"]) == 2
    lines = [line for line in capsys.readouterr().out.splitlines() if "looks like" in line]
    assert sorted(lines) == sorted(f"{n.path}\tlooks like {n.first} ({n.bits} of 256 hash bits differ): {n.why}" for n in found.near)
    assert not check_data(data, near_bits=0).near  # no copy here hashes the same


def test_the_demo_images_of_a_class_look_alike_but_not_near_copies(demo_data):
    # stripes of one kind a class: the closest two of 450 were 66 bits apart when the bound was chosen
    found = check_data(demo_data, near_bits=NEAR_BITS)
    assert found.images == 450 and found.near == ()


@pytest.mark.parametrize("bits", [-1, MAX_NEAR_BITS + 1])
def test_the_near_copy_bound_is_range_checked(data, bits):
    with pytest.raises(DataError, match=f"--near-copies: expected 0 to 128 bits of 256, got {bits}"):
        check_data(data, near_bits=bits)
