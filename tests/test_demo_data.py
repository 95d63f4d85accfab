import hashlib

from clfpipe.demo_data import CLASSES, DemoSpec, write_demo_dataset


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
