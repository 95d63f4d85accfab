import hashlib

import pytest

from clfpipe.contract.errors import DataError
from clfpipe.demo_data import CLASSES, DemoSpec, write_demo_dataset, write_demo_multilabel


def _digest(root):
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.jpg")):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def test_layout_and_counts(tmp_path):
    counts = write_demo_dataset(tmp_path, seed=0)
    assert counts == {"train": 360, "valid": 90}
    for split, n in (("train", 120), ("valid", 30)):
        for label in CLASSES:
            assert len(list((tmp_path / split / label).glob("*.jpg"))) == n


def test_deterministic_for_a_seed(tmp_path):
    spec = DemoSpec(train_per_class=4, valid_per_class=2)
    write_demo_dataset(tmp_path / "a", seed=3, spec=spec)
    write_demo_dataset(tmp_path / "b", seed=3, spec=spec)
    write_demo_dataset(tmp_path / "c", seed=4, spec=spec)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")


@pytest.mark.parametrize("multi_label", [False, True])
def test_demo_images_are_never_mixed_into_a_folder_of_other_files(tmp_path, multi_label):
    """They were written beside whatever the folder held (a user's dataset got three new classes)."""
    write = (lambda out: write_demo_multilabel(out, train=4, valid=2, image_size=32)) if multi_label else \
        (lambda out: write_demo_dataset(out, spec=DemoSpec(train_per_class=2, valid_per_class=1, image_size=32)))
    write(tmp_path / "demo")
    write(tmp_path / "demo")  # its own: written again
    mine = tmp_path / "mine"
    (mine / "train" / "dog").mkdir(parents=True)
    (mine / "train" / "dog" / "rex.jpg").write_bytes(b"a photo")
    with pytest.raises(DataError, match=r"holds files the demo dataset does not \(such as train/dog/rex.jpg\): expected a new "
                                        r"folder or one with a demo dataset; nothing was written$"):
        write(mine)
    assert sorted(p.relative_to(mine).as_posix() for p in mine.rglob("*")) == ["train", "train/dog", "train/dog/rex.jpg"]
