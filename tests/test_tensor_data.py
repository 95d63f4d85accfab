"""The on-device training pipeline (nvJPEG on CUDA), exercised here on the CPU."""

import numpy as np
import pytest
import torch

from clfpipe.dataset import scan_split
from clfpipe.demo_data import DemoSpec, write_demo_dataset
from clfpipe.preprocess import PreprocessSpec, load_image, normalize, resize_crop
from clfpipe.recipe import load_recipe
from train.loop import train_run
from clfpipe.gpu_decode import decode_batch
from train.tensor_data import augment_batch, encoded_loader


@pytest.fixture
def data(tmp_path):
    write_demo_dataset(tmp_path / "data", spec=DemoSpec(train_per_class=6, valid_per_class=2, image_size=48))
    return tmp_path / "data"


def test_loader_workers_ship_encoded_bytes_across_epochs(data):
    split = scan_split(data, "train")
    loader = encoded_loader(split, 4, num_workers=2, seed=0)
    for _ in range(2):  # a second epoch starts new workers
        batches = list(loader)
        assert len(batches) == 4 and all(len(b[0]) == 4 and b[0][0].dtype == torch.uint8 for b in batches)


def test_decode_and_unaugmented_batch_match_the_spec(data):
    split = scan_split(data, "valid")
    spec = PreprocessSpec(48, 48)
    encoded = [torch.frombuffer(bytearray(f.read_bytes()), dtype=torch.uint8) for f in split.files]
    images = decode_batch(encoded, torch.device("cpu"))
    pil = np.stack([np.asarray(load_image(f)) for f in split.files])
    assert np.abs(torch.stack(images).permute(0, 2, 3, 1).numpy().astype(int) - pil).max() <= 2  # two JPEG decoders
    batch = augment_batch(images, spec, "none", torch.Generator().manual_seed(0))
    expected = normalize(np.stack([resize_crop(load_image(f), spec) for f in split.files]), spec)
    assert batch.shape == (6, 3, 48, 48) and np.abs(batch.numpy() - expected).mean() < 0.05


def test_augmentation_is_seeded(data):
    split = scan_split(data, "train")
    images = decode_batch([torch.frombuffer(bytearray(f.read_bytes()), dtype=torch.uint8) for f in split.files[:4]], torch.device("cpu"))
    spec = PreprocessSpec(40, 32)
    a = augment_batch(images, spec, "top_down", torch.Generator().manual_seed(3))
    b = augment_batch(images, spec, "top_down", torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == (4, 3, 32, 32)


@pytest.mark.slow
def test_training_with_on_device_decode_and_workers(data, tmp_path):
    recipe = load_recipe(None, ["data.decode=tensor", "data.num_workers=2", "data.batch_size=6", "stages.0.epochs=1",
                                "stages.0.size=32", "evaluate.tta=[]", "evaluate.report=false"])
    manifest = train_run(data, tmp_path / "run", recipe, log=lambda _: None)
    assert manifest.stage("train")["epochs"] == 1


def test_device_preprocessor_batches_and_blames_the_bad_request(data):
    """The server's nvJPEG path, run here on the CPU device."""
    from clfpipe.gpu_decode import DevicePreprocessor

    files = scan_split(data, "valid").files
    spec = PreprocessSpec(40, 32)
    good = [np.array([[f.read_bytes()]], dtype=object) for f in files[:3]]
    results = DevicePreprocessor(spec, "cpu").batch([good[0], np.array([[b"junk"]], dtype=object), good[1], good[2]])
    assert isinstance(results[1], ValueError) and "not a decodable image" in str(results[1])
    pil = np.stack([resize_crop(load_image(f), spec) for f in files[:3]])
    got = np.concatenate([results[0], results[2], results[3]])
    assert got.shape == (3, 32, 32, 3) and got.dtype == np.uint8
    assert np.abs(got.astype(int) - pil).mean() < 6  # another decoder and resampler: close, not identical
