import numpy as np
import pytest
import torch

from clfpipe.contract.dataset import scan_split
from clfpipe.contract.preprocess import PreprocessSpec
from clfpipe.contract.recipe import ModelConfig
from clfpipe.demo_data import DemoSpec, write_demo_dataset
from clfpipe.nn.models import build_model
from clfpipe.train.precompute import FeatureCache, cached_features


@pytest.fixture
def setup(tmp_path):
    write_demo_dataset(tmp_path / "data", spec=DemoSpec(train_per_class=2, valid_per_class=1, image_size=32))
    torch.manual_seed(0)
    model = build_model(ModelConfig(), 3).eval()
    return tmp_path, model, FeatureCache(tmp_path / "cache"), PreprocessSpec(32, 32)


def _features(root, model, cache, spec):
    return cached_features(model, scan_split(root / "data", "train"), spec, cache, batch_size=4, device=torch.device("cpu"))


def test_miss_then_hit_with_equal_features(setup):
    root, model, cache, spec = setup
    first = _features(root, model, cache, spec)
    assert first.status == "miss" and first.features.shape == (6, 1024)
    second = _features(root, model, cache, spec)
    assert second.status == "hit" and second.key == first.key
    np.testing.assert_array_equal(first.features, second.features)


def test_changed_image_size_or_weights_is_a_miss(setup):
    root, model, cache, spec = setup
    first = _features(root, model, cache, spec)
    image = sorted((root / "data" / "train" / "checker").glob("*.jpg"))[0]
    image.write_bytes((root / "data" / "train" / "vertical" / "vertical_0000.jpg").read_bytes())  # same name, new content
    changed = _features(root, model, cache, spec)
    assert changed.status == "miss" and changed.key != first.key
    assert _features(root, model, cache, PreprocessSpec(40, 32)).status == "miss"
    with torch.no_grad():
        model.body[0].weight[0, 0, 0, 0] += 1.0
    assert _features(root, model, cache, spec).status == "miss"


def test_corrupt_cache_file_is_rebuilt(setup):
    root, model, cache, spec = setup
    first = _features(root, model, cache, spec)
    array_path, _ = cache.paths(first.key)
    data = bytearray(array_path.read_bytes())
    data[-10:] = b"\x00" * 10
    array_path.write_bytes(bytes(data))
    again = _features(root, model, cache, spec)
    assert again.status == "rebuilt (corrupt)"
    np.testing.assert_array_equal(again.features, first.features)
    assert _features(root, model, cache, spec).status == "hit"
