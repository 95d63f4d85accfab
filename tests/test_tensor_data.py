"""The two training-image paths (Pillow in loader workers; tensors decoded on the device: nvJPEG on
CUDA, exercised here on the CPU) share one transforms definition and must agree."""

import contextlib
import logging
import pickle
import re
import threading
import time
from multiprocessing.reduction import ForkingPickler

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from clfpipe.contract.augment import AUGMENTS, DRAWS, AugmentParams, from_unit, sample
from clfpipe.contract.dataset import scan_split
from clfpipe.contract.errors import DataError
from clfpipe.contract.preprocess import PreprocessSpec, load_image, mostly_jpeg, normalize, resize_crop
from clfpipe.contract.preprocess import decode_image as pil_decode
from clfpipe.contract.recipe import load_recipe
from clfpipe.demo_data import DemoSpec, damaged_jpegs, write_demo_dataset, write_format_samples
from clfpipe.nn import transforms
from clfpipe.nn.models import build_model
from clfpipe.nn.transforms import (
    _scaled_crop,
    apply,
    apply_batch,
    augment_crops,
    crop_batch,
    decode_batch,
    eval_pixels,
    sample_batch,
    torch_draws,
)
from clfpipe.train import data as train_data
from clfpipe.train.data import DecodedCache, DeviceBatches, ImageDataset, augment_decoded, encoded_loader
from clfpipe.train.loop import train_run
from clfpipe.train.stage import Context, StageData, on_device_decode


def device_batch(encoded, device, spec, *, policy, generator):
    """Encoded images -> the model's input, as a stage's two input steps make it."""
    return augment_decoded(decode_batch(encoded, device), spec, policy=policy, generator=generator)


@pytest.fixture
def data(tmp_path):
    write_demo_dataset(tmp_path / "data", spec=DemoSpec(train_per_class=6, valid_per_class=2, image_size=48))
    return tmp_path / "data"


def _encoded(files):
    return [torch.frombuffer(bytearray(f.read_bytes()), dtype=torch.uint8) for f in files]


def _tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)


def test_loader_workers_ship_encoded_bytes_across_epochs(data):
    split = scan_split(data, "train")
    label_of = {f.read_bytes(): label for f, label in zip(split.files, split.labels)}
    loader = encoded_loader(split, 4, num_workers=2, seed=0)
    for _ in range(2):  # a second epoch with the same (persistent) workers
        seen = [(bytes(e.numpy()), int(y)) for encoded, labels in loader for e, y in zip(encoded.images(), labels)]
        assert len(seen) == 16  # 18 files, batches of 4, the last partial batch dropped
        assert len({b for b, _ in seen}) == 16 and all(label_of[b] == y for b, y in seen)


@pytest.mark.parametrize("labels", [[0, 2], [(1, 0, 1), (0, 1, 1)]])  # classes; multi-hot (multi-label)
def test_a_batch_crosses_from_a_worker_as_its_bytes_and_values(labels):
    """Pickled as a worker's result is (torch's ForkingPickler), a collated batch is one shared
    tensor, the bytes; lengths, indices and labels travel by value, and arrive as tensors."""
    items = [(torch.tensor([1, 2, 3], dtype=torch.uint8), train_data._target(labels[0]), 7),
             (torch.tensor([9], dtype=torch.uint8), train_data._target(labels[1]), 3)]
    sent = train_data._collate(items)
    tensors: list[torch.Tensor] = []

    class Counting(ForkingPickler):
        def persistent_id(self, obj: object) -> None:  # sees every object pickled, then pickles it as usual
            if isinstance(obj, torch.Tensor):
                tensors.append(obj)

    data = Counting.dumps(sent)
    assert len(tensors) == 1 and tensors[0].tolist() == [1, 2, 3, 9]  # the bytes of both files, nothing else
    encoded, y = pickle.loads(data)
    assert type((encoded, y)) is tuple and isinstance(encoded, train_data.EncodedBatch)
    assert [bytes(e.numpy()) for e in encoded.images()] == [b"\x01\x02\x03", b"\x09"]
    assert encoded.indices.tolist() == [7, 3] and torch.equal(y, sent[1])


@pytest.mark.parametrize("kept", [None, 2, 0])  # every image, two images' bytes, nothing
def test_the_decoded_cache_decodes_a_file_once_and_gives_the_same_pixels(data, monkeypatch, kept):
    split = scan_split(data, "train")
    loader = encoded_loader(split, 4, num_workers=0, seed=0)
    calls: list[int] = []
    monkeypatch.setattr(train_data, "decode_batch", lambda files, device, names: calls.append(len(files)) or decode_batch(files, device))
    one_image = 3 * 48 * 48
    cache = DecodedCache(torch.device("cpu"), 10**9 if kept is None else kept * one_image)
    ever: set[int] = set()
    for _ in range(2):
        calls.clear()
        kept_before, seen = set(cache.images), []
        for encoded, _ in loader:
            got = cache(encoded)
            assert all(torch.equal(a, b) for a, b in zip(got, decode_batch(encoded.images(), torch.device("cpu"))))
            seen += encoded.indices.tolist()
        assert len(seen) == len(set(seen)) == len(loader) * 4
        assert sum(calls) == sum(i not in kept_before for i in seen)  # decoded: what was not kept from before
        ever |= set(seen)
    assert len(cache.images) == (len(ever) if kept is None else kept)
    assert cache.used == sum(img.numel() for img in cache.images.values()) <= cache.budget


def test_decoders_agree_and_eval_pixels_match_the_spec_on_both_paths(data):
    split = scan_split(data, "valid")
    spec = PreprocessSpec(40, 32)
    decoded = decode_batch(_encoded(split.files), torch.device("cpu"))
    pil = [load_image(f) for f in split.files]
    for img, ref in zip(decoded, pil):  # two JPEG decoders: libjpeg-turbo builds may differ by a level or two
        assert np.abs(img.permute(1, 2, 0).numpy().astype(int) - np.asarray(ref, dtype=int)).max() <= 2
    for ref in pil:  # the same decoded pixels through both resamplers: the spec's eval pixels
        on_device = eval_pixels(_tensor(ref), spec).permute(1, 2, 0).numpy()
        assert on_device.shape == (32, 32, 3)
        assert np.abs(on_device.astype(int) - resize_crop(ref, spec).astype(int)).max() <= 1


@pytest.mark.parametrize("params", [AugmentParams(), AugmentParams(zoom=1.1, u=0.2, v=0.9, hflip=True),
                                    AugmentParams(zoom=1.05, u=1.0, v=0.0, vflip=True, rot90=True)])
def test_deterministic_augmentation_gives_the_same_pixels_on_both_paths(data, params):
    img = load_image(scan_split(data, "train").files[0])
    spec = PreprocessSpec(40, 32)
    from_pil = np.asarray(apply(img, params, spec), dtype=int)
    from_tensor = apply(_tensor(img), params, spec).permute(1, 2, 0).numpy().astype(int)
    assert from_pil.shape == from_tensor.shape == (32, 32, 3)
    assert np.abs(from_pil - from_tensor).max() <= 1


def test_random_parts_draw_the_same_parameters_on_both_paths():
    """Both paths draw with contract.augment.sample from a torch generator: same seed, same draws;
    and the draws follow the policy's ranges and probabilities."""
    policy = AUGMENTS["top_down"]
    pil_path = [sample(policy, torch_draws(torch.Generator().manual_seed(7))) for _ in range(1)]
    gen = torch.Generator().manual_seed(7)
    draws = [sample(policy, torch_draws(gen)) for _ in range(2000)]
    assert pil_path[0] == draws[0]
    zooms = np.array([d.zoom for d in draws])
    assert 1.0 <= zooms.min() and zooms.max() <= policy.max_zoom
    assert abs(np.mean([d.angle != 0 for d in draws]) - policy.rotate_p) < 0.04
    assert np.abs([d.angle for d in draws]).max() <= policy.rotate_degrees
    for flag in ("hflip", "vflip", "rot90"):
        assert abs(np.mean([getattr(d, flag) for d in draws]) - 0.5) < 0.04
    assert all(abs(d.brightness - 1) <= policy.brightness and abs(d.contrast - 1) <= policy.contrast for d in draws)
    assert not any(d.vflip or d.rot90 for d in (sample(AUGMENTS["side_on"], torch_draws(gen)) for _ in range(200)))
    batch = sample_batch(policy, 5, torch.Generator().manual_seed(7))  # the device path's one draw per batch
    assert batch == [sample(policy, torch_draws(g)) for g in [torch.Generator().manual_seed(7)] for _ in range(5)]
    assert sample_batch(AUGMENTS["none"], 3, gen) == [AugmentParams()] * 3


def test_a_draw_maps_its_unit_values_onto_the_policy_ranges():
    """``from_unit`` against its closed form at the ends of [0, 1)."""
    policy = AUGMENTS["top_down"]
    low = from_unit(policy, [0.0] * DRAWS)
    assert (low.zoom, low.u, low.v, low.angle) == (1.0, 0.0, 0.0, -policy.rotate_degrees)
    assert (low.brightness, low.contrast) == (1 - policy.brightness, 1 - policy.contrast)
    assert low.hflip and low.vflip and low.rot90
    high = from_unit(policy, [0.999] * DRAWS)
    assert high.angle == 0.0 and not (high.hflip or high.vflip or high.rot90)  # 0.999 >= rotate_p: no turn
    assert high.zoom == pytest.approx(1 + 0.999 * (policy.max_zoom - 1))
    assert from_unit(AUGMENTS["none"], [0.0] * DRAWS) == AugmentParams()
    with pytest.raises(ValueError, match=f"expected {DRAWS} values"):
        from_unit(policy, [0.5] * 3)


def test_pil_dataset_and_device_batch_agree_without_augmentation(data):
    split = scan_split(data, "valid")
    spec = PreprocessSpec(40, 32)
    from_pil = torch.stack([ImageDataset(split, spec)[i][0] for i in range(len(split))])
    on_device = device_batch(_encoded(split.files), torch.device("cpu"), spec, policy=AUGMENTS["none"], generator=torch.Generator())
    expected = normalize(np.stack([resize_crop(load_image(f), spec) for f in split.files]), spec)
    np.testing.assert_allclose(from_pil.numpy(), expected, atol=1e-6)
    # one JPEG decoder level or resampler level is 1/255/std ~ 0.018 after normalisation
    assert np.abs(on_device.numpy() - expected).max() < 0.06 and np.abs(on_device.numpy() - expected).mean() < 0.01


def test_augmentation_is_seeded_and_moves_pixels(data):
    split = scan_split(data, "train")
    spec = PreprocessSpec(40, 32)
    encoded = _encoded(split.files[:4])
    a = device_batch(encoded, torch.device("cpu"), spec, policy=AUGMENTS["top_down"], generator=torch.Generator().manual_seed(3))
    b = device_batch(encoded, torch.device("cpu"), spec, policy=AUGMENTS["top_down"], generator=torch.Generator().manual_seed(3))
    c = device_batch(encoded, torch.device("cpu"), spec, policy=AUGMENTS["top_down"], generator=torch.Generator().manual_seed(4))
    plain = device_batch(encoded, torch.device("cpu"), spec, policy=AUGMENTS["none"], generator=torch.Generator())
    assert torch.equal(a, b) and a.shape == (4, 3, 32, 32)
    assert not torch.equal(a, c) and not torch.equal(a, plain)


@pytest.mark.slow
def test_training_with_on_device_decode_and_workers(data, tmp_path):
    recipe = load_recipe(None, ["data.decode=tensor", "data.num_workers=2", "data.batch_size=6", "stages.0.epochs=1",
                                "stages.0.size=32", "evaluate.tta=[]", "evaluate.report=false"])
    manifest = train_run(data, tmp_path / "run", recipe)
    assert manifest.stage("train")["epochs"] == 1


def test_device_preprocessor_batches_and_blames_the_bad_request(data):
    """The server's nvJPEG path, run here on the CPU device."""
    from clfpipe.runtime.nvjpeg import DevicePreprocessor

    files = scan_split(data, "valid").files
    spec = PreprocessSpec(40, 32)
    good = [np.array([[f.read_bytes()]], dtype=object) for f in files[:3]]
    results = DevicePreprocessor(spec, "cpu").batch([good[0], np.array([[b"junk"]], dtype=object), good[1], good[2]])
    assert isinstance(results[1], ValueError) and "not an image" in str(results[1])  # the Pillow path's words
    pil = np.stack([resize_crop(load_image(f), spec) for f in files[:3]])
    got = np.concatenate([results[0], results[2], results[3]])
    assert got.shape == (3, 32, 32, 3) and got.dtype == np.uint8
    assert np.abs(got.astype(int) - pil).max() <= 3  # another JPEG decoder, the same resize on the device


@pytest.mark.parametrize("policy", ["side_on", "top_down"])
def test_the_batched_augmentation_is_the_one_by_one_augmentation(policy):
    """Every draw after the crop (turns, lighting, flips, quarter turns) batched equals ``apply``
    image by image, up to a level where float sums round differently."""
    gen = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=gen) for h, w in [(60, 80), (75, 50), (64, 64)] * 4]
    spec = PreprocessSpec(48, 40)
    params = [sample(AUGMENTS[policy], torch_draws(gen)) for _ in images]
    params[0] = AugmentParams(angle=7.5, brightness=1.04, contrast=0.96)  # a turn that is not a quarter
    assert any(p.angle for p in params) and any(not p.angle for p in params) and any(p.hflip for p in params)
    crops = torch.stack([_scaled_crop(img, p, spec) for img, p in zip(images, params)]).float()
    given = crops.clone()
    batched = augment_crops(crops, params, spec.crop)
    single = torch.stack([apply(img, p, spec) for img, p in zip(images, params)])
    diff = (batched.int() - single.int()).abs()
    assert batched.shape == (12, 3, 40, 40) and batched.dtype == torch.float32
    assert torch.equal(batched, batched.round().clamp(0, 255)) and torch.equal(crops, given)  # whole levels; input untouched
    assert diff.max() <= 1 and (diff > 0).float().mean() < 0.01
    whole = (apply_batch(images, params, spec).int() - single.int()).abs()  # with the batched crops
    assert whole.max() <= 3 and whole.float().mean() < 0.5  # a level of the crop, through lighting


def _aten_aa_weights(in_size: int, out_size: int, start: int, count: int, padded: int) -> np.ndarray:
    """ATen's antialiased bilinear weights (``_compute_indices_min_size_weights_aa``), output pixel
    by output pixel over every source pixel: the closed form ``_filter_taps`` computes."""
    scale = in_size / out_size
    support, invscale = (scale, 1 / scale) if scale >= 1 else (1.0, 1.0)
    rows = np.zeros((count, padded))
    for i in range(count):
        center = scale * (start + i + 0.5)
        lo, hi = max(int(center - support + 0.5), 0), min(int(center + support + 0.5), in_size)
        w = np.array([max(0.0, 1 - abs((j - center + 0.5) * invscale)) for j in range(lo, hi)])
        rows[i, lo:hi] = w / w.sum()
    return rows


@pytest.mark.parametrize("in_size, out_size, start", [(500, 61, 7), (8, 48, 4), (40, 40, 0), (375, 44, 0), (33, 47, 3)])
def test_resize_weights_over_their_taps_are_the_filter_over_every_pixel(in_size, out_size, start):
    """Shrinking eightfold, enlarging sixfold, unscaled, a window at an edge: computed over the
    taps ``_taps`` allows, the rows equal the filter over the whole (padded) row."""
    count, padded = min(40, out_size - start), -(-in_size // 32) * 32
    taps = transforms._filter_taps(torch.tensor([in_size]), torch.tensor([out_size]), torch.tensor([start]), count,
                                   transforms._taps(in_size, out_size))
    got = transforms._rows(*taps, padded)
    assert got.shape == (1, count, padded)
    np.testing.assert_allclose(got[0].numpy(), _aten_aa_weights(in_size, out_size, start, count, padded), atol=1e-7)


@pytest.mark.parametrize("chunk, dtype", [(1 << 28, torch.float32), (3 * 64 * 96 * 2, torch.float32), (1 << 28, torch.float16)])
def test_the_batched_crops_are_resize_then_crop(chunk, dtype, monkeypatch):
    """The windows of every size, zoom and place, shrunk (noise, where filters differ most) and
    enlarged (an 8x8 digit), padded among others of nearly their size, equal ``_scaled_crop``'s
    resize then crop up to a level: one resampling per padded size, or two images at a time; and
    in half precision, the products CUDA runs (here the CPU's)."""
    monkeypatch.setattr(transforms, "_CHUNK_ELEMENTS", chunk)
    gen = torch.Generator().manual_seed(1)
    sizes = [(60, 80), (375, 500), (8, 8), (58, 75), (75, 50), (60, 80), (8, 8), (370, 497), (64, 96)]
    assert len({transforms._bucket(h, w) for h, w in sizes}) == 4  # (64, 96), (384, 512), (32, 32), (96, 64)
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=gen) for h, w in sizes]
    for spec in (PreprocessSpec(48, 40), PreprocessSpec(73, 64)):
        params = [sample(AUGMENTS["side_on"], torch_draws(gen)) for _ in images]
        params[1] = AugmentParams(zoom=1.1, u=1.0, v=0.0)  # a corner
        batched = crop_batch(images, params, spec, dtype)
        single = torch.stack([_scaled_crop(img, p, spec) for img, p in zip(images, params)]).float()
        assert batched.shape == (len(images), 3, spec.crop, spec.crop)
        assert (batched - single).abs().max() <= 1 and (batched - single).abs().mean() < 0.3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("sizes", [[(75, 100)] * 6, [(75, 100), (8, 8), (60, 90)] * 2], ids=["one size", "three sizes"])
def test_the_augment_step_makes_the_models_layout_from_the_crops_on(sizes, dtype):
    """In channels_last (the model's on CUDA) the batch has the values it has in NCHW, and that
    layout from the crops on: ``in_layout`` would find nothing left to copy. One size is
    the batch resampled in one piece (its levels copied to float32 in place), several are put in
    place group by group."""
    gen = torch.Generator().manual_seed(2)
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=gen) for h, w in sizes]
    spec = PreprocessSpec(48, 40)
    for policy in ("side_on", "none"):
        nchw, nhwc = (transforms.train_pixels_batch(images, AUGMENTS[policy], spec, torch.Generator().manual_seed(5), dtype, fmt)
                      for fmt in (torch.contiguous_format, torch.channels_last))
        assert nchw.is_contiguous() and nhwc.is_contiguous(memory_format=torch.channels_last)
        assert nhwc.dtype == torch.float32 and torch.equal(nchw, nhwc)
        assert train_data.in_layout(nhwc, channels_last=True).data_ptr() == nhwc.data_ptr()
    params = [AugmentParams(zoom=1.05, u=0.3, v=0.8)] * len(images)
    single = torch.stack([_scaled_crop(img, p, spec) for img, p in zip(images, params)]).float()
    assert (crop_batch(images, params, spec, dtype, torch.channels_last) - single).abs().max() <= 1


@pytest.mark.parametrize("height, width", [(8, 8), (375, 500)])
def test_an_augmentation_at_zoom_one_in_the_centre_is_the_evaluation_pixels(height, width):
    """Training's zoomed crop scales the whole image before cropping, so a tiny image (an 8x8
    digit) is seen at evaluation's scale; a window counted in source pixels never was."""
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8))
    spec = PreprocessSpec(73, 64)
    assert np.array_equal(np.asarray(apply(img, AugmentParams(), spec)), resize_crop(img, spec))
    assert torch.equal(apply(_tensor(img), AugmentParams(), spec), eval_pixels(_tensor(img), spec))
    zoomed = apply(img, AugmentParams(zoom=1.05), spec)  # 5% larger, not the 14% of a 7-pixel window
    assert zoomed.size == (64, 64)


def _prefetched(ahead: int, fail_at: tuple[int, int] | None = None, two_steps: bool = True,
                thread_per_step: bool = False) -> DeviceBatches:
    """Six batches through a "decode" (a list of tensors) and an "augment" drawing from a generator,
    as the device path does; fail_at = (step, batch) raises there."""
    gen = torch.Generator().manual_seed(5)
    loader = [(torch.full((2, 3), float(i)), torch.tensor([i, i])) for i in range(6)]

    def check(step: int, x: torch.Tensor) -> None:
        if fail_at == (step, int(x[0, 0])):
            raise DataError("corrupt image in a training batch: test")

    def decode(x: torch.Tensor) -> list[torch.Tensor]:
        check(0, x)
        return list(x)

    def augment(rows: list[torch.Tensor]) -> torch.Tensor:
        check(1, rows[0][None])
        return torch.stack(rows) + torch.rand((len(rows), 3), generator=gen)

    steps = (decode, augment) if two_steps else (lambda x: augment(list(x)))
    return DeviceBatches(loader, steps, torch.device("cpu"), ahead=ahead, thread_per_step=thread_per_step)


def _prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "clfpipe-prefetch"]


@pytest.mark.parametrize("two_steps, thread_per_step", [(True, False), (True, True), (False, False)])
def test_prefetching_batches_in_threads_gives_the_inline_batches_and_stops_with_its_consumer(two_steps, thread_per_step):
    inline = list(_prefetched(0, two_steps=two_steps))
    threads = 2 if two_steps and thread_per_step else 1
    assert _prefetched(2, two_steps=two_steps, thread_per_step=thread_per_step).threads == threads
    under_way = iter(_prefetched(2, two_steps=two_steps, thread_per_step=thread_per_step))
    first = next(under_way)
    assert len(_prefetch_threads()) == threads
    ahead = [first, *under_way]
    assert len(ahead) == 6 and all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(inline, ahead))
    assert [int(y[0]) for _, y in ahead] == list(range(6))
    batches = iter(_prefetched(2, two_steps=two_steps, thread_per_step=thread_per_step))
    next(batches)
    batches.close()  # a consumer that stops early (lr_find): the threads are gone, not blocked on a queue
    assert not _prefetch_threads()
    for step in (0, 1) if two_steps else (1,):  # an error in either step reaches the consumer, after the batches before it
        batches = iter(_prefetched(2, fail_at=(step, 3), two_steps=two_steps, thread_per_step=thread_per_step))
        assert [int(next(batches)[1][0]) for _ in range(3)] == [0, 1, 2]
        with pytest.raises(DataError, match="corrupt image"):
            next(batches)
        assert not _prefetch_threads()


def test_a_stage_stops_its_loader_workers_when_it_ends(data, tmp_path):
    """Left to the garbage collector, a persistent loader's shutdown waited 5 s per worker."""
    recipe = load_recipe(None, ["data.num_workers=2", "data.batch_size=4", "stages.0.size=32"])
    ctx = Context(recipe, scan_split(data, "train"), scan_split(data, "valid"), torch.device("cpu"), tmp_path)
    model = build_model(recipe.model, 3)
    with contextlib.closing(StageData(model, recipe.stages[0], 0, ctx)) as stage:
        next(iter(stage.train_loader))  # an epoch left unfinished, as lr_find leaves it
        stage.validate()
        workers = stage.host_loader._iterator._workers + stage.valid_loader._iterator._workers
        assert len(workers) == 4 and all(w.is_alive() for w in workers)
    start = time.perf_counter()
    for w in workers:
        w.join(timeout=5)
    assert not any(w.is_alive() for w in workers) and time.perf_counter() - start < 2
    assert stage.host_loader._iterator is None and stage.valid_loader._iterator is None


def test_a_stage_decodes_and_augments_in_its_prefetch_threads_as_inline(data, tmp_path):
    """The stage's two input steps (decode, augment) in their threads give the inline epoch."""
    recipe = load_recipe(None, ["data.decode=tensor", "data.num_workers=0", "data.batch_size=4", "stages.0.size=32"])
    ctx = Context(recipe, scan_split(data, "train"), scan_split(data, "valid"), torch.device("cpu"), tmp_path)
    with contextlib.closing(StageData(build_model(recipe.model, 3), recipe.stages[0], 0, ctx)) as stage:
        assert stage.tensor_decode and len(stage.train_loader.steps) == 2
        epochs = []
        for ahead in (0, 2):
            stage.train_loader.ahead = ahead
            stage.seed_epoch(1)
            epochs.append(list(stage.train_loader))
    inline, threaded = epochs
    assert len(inline) == len(threaded) == 4 and inline[0][0].shape == (4, 3, 32, 32)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(inline, threaded))


def test_auto_decodes_on_the_gpu_only_when_the_images_are_jpegs(data, tmp_path):
    jpegs = scan_split(data, "train").files
    pngs = []
    for path in jpegs[:4]:
        pngs.append(tmp_path / f"{path.stem}.png")
        Image.open(path).save(pngs[-1])
    assert mostly_jpeg(jpegs) and not mostly_jpeg(pngs)
    assert mostly_jpeg([*jpegs[:2], *pngs[:2]]) and not mostly_jpeg([jpegs[0], *pngs[:3]])  # at least half
    assert not mostly_jpeg([]) and not mostly_jpeg([tmp_path / "missing.jpg"])
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    table = {("auto", cuda, "jpeg"): True, ("auto", cuda, "png"): False, ("auto", cpu, "jpeg"): False,
             ("tensor", cpu, "png"): True, ("tensor", cuda, "png"): True, ("pil", cuda, "jpeg"): False}
    for (decode, device, kind), expected in table.items():
        assert on_device_decode(decode, device, jpegs if kind == "jpeg" else pngs) is expected, (decode, device, kind)


def test_the_device_path_reads_every_format_as_the_pillow_path_and_the_server_do(tmp_path):
    """A 16-bit PNG is scaled to 8 bits (torchvision alone kept its uint16 levels, which the
    augmentation then read as huge values); a BMP is read (torchvision reads none)."""
    files = write_format_samples(tmp_path)
    decoded = decode_batch(_encoded(files), torch.device("cpu"), names=files)
    for path, img in zip(files, decoded):
        assert img.dtype == torch.uint8 and torch.equal(img, _tensor(load_image(path))), path.name


def test_a_file_that_does_not_decode_on_the_device_path_is_named(data):
    split = scan_split(data, "train")
    victim = split.files[3]
    victim.write_bytes(victim.read_bytes()[:300])  # after the scan, as a file cut short mid-run
    encoded, _ = next(iter(encoded_loader(split, len(split), num_workers=0, seed=0)))
    cpu = torch.device("cpu")
    with pytest.raises(DataError, match=rf"^corrupt image file {re.escape(str(victim))}: not a decodable image: \w"):
        DecodedCache(cpu, 0, split.files)(encoded)
    position = encoded.indices.tolist().index(3)
    with pytest.raises(DataError, match=rf"^corrupt image #{position} of the batch: not a decodable image: \w"):
        DecodedCache(cpu, 0)(encoded)


def _damaged_jpeg_only_pillow_reads() -> bytes:
    for damaged in damaged_jpegs(2000):
        with contextlib.suppress(ValueError):
            pillow = pil_decode(damaged)
            try:
                torchvision.io.decode_jpeg(torch.frombuffer(bytearray(damaged), dtype=torch.uint8))
            except RuntimeError:
                assert pillow.size == (80, 60)
                return damaged
    raise AssertionError("no damaged JPEG that only Pillow reads among 2000")


def test_a_batch_the_jpeg_decoder_refuses_is_decoded_on_the_host_as_the_pillow_path_does(data, caplog):
    damaged = _damaged_jpeg_only_pillow_reads()
    files = scan_split(data, "valid").files
    encoded = _encoded(files[:2]) + [torch.frombuffer(bytearray(damaged), dtype=torch.uint8)]
    with caplog.at_level(logging.WARNING, logger="clfpipe.nn.transforms"):
        decoded = decode_batch(encoded, torch.device("cpu"))
    assert "the cpu JPEG decoder refused a batch of 3 images that the host decodes (Image is incomplete or truncated): decoded there" in caplog.text
    assert torch.equal(decoded[2], _tensor(pil_decode(damaged)))
    assert all(torch.equal(img, _tensor(load_image(f))) for img, f in zip(decoded, files[:2]))
