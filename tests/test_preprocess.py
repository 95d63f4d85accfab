import io

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from clfpipe.contract.preprocess import PreprocessSpec, decode_image, normalize, preprocess_file, resize_crop


def _png(array: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def test_spec_round_trip_and_validation():
    spec = PreprocessSpec(resize=80, crop=64)
    assert PreprocessSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError, match="crop <= resize"):
        PreprocessSpec(resize=32, crop=64)
    with pytest.raises(ValueError, match="interpolation"):
        PreprocessSpec(resize=64, crop=64, interpolation="lanczos9")


def test_resize_shorter_side_then_centre_crop():
    img = Image.fromarray(np.zeros((100, 200, 3), np.uint8))
    out = resize_crop(img, PreprocessSpec(resize=50, crop=40))
    assert out.shape == (40, 40, 3) and out.dtype == np.uint8


def test_normalize_matches_torchvision():
    spec = PreprocessSpec(resize=8, crop=8)
    pixels = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    expected = v2.Normalize(spec.mean, spec.std)(torch.from_numpy(pixels).permute(2, 0, 1).float() / 255)
    np.testing.assert_allclose(normalize(pixels, spec), expected.numpy(), atol=1e-6)


@pytest.mark.parametrize("array, mode", [
    (np.full((20, 30), 128, np.uint8), None),  # grayscale
    (np.full((20, 30, 4), 200, np.uint8), None),  # RGBA
    (np.full((20, 30), 65535, np.uint16), None),  # 16-bit grayscale PNG
])
def test_any_mode_decodes_to_rgb(array, mode, tmp_path):
    img = decode_image(_png(array, mode))
    assert img.mode == "RGB" and img.size == (30, 20)
    path = tmp_path / "x.png"
    path.write_bytes(_png(array, mode))
    assert preprocess_file(path, PreprocessSpec(16, 16)).shape == (3, 16, 16)


def test_16_bit_white_stays_white():
    assert np.asarray(decode_image(_png(np.full((4, 4), 65535, np.uint16)))).min() == 255


def test_bad_bytes_say_what_is_wrong():
    with pytest.raises(ValueError, match="empty image"):
        decode_image(b"")
    with pytest.raises(ValueError, match="not an image: expected encoded JPEG, PNG, BMP or WebP bytes"):
        decode_image(b"hello, world")
    jpeg = io.BytesIO()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(jpeg, format="JPEG")
    with pytest.raises(ValueError, match="not a decodable image"):
        decode_image(jpeg.getvalue()[:200])  # truncated
    with pytest.raises(ValueError, match="image too large"):
        decode_image(_png(np.zeros((100, 100), np.uint8)), max_pixels=5000)


def test_exif_orientation_is_left_as_stored_on_every_decoder(tmp_path):
    """A JPEG tagged 'rotate 90' (EXIF orientation 6, as phones write) decodes as stored, wider
    than tall, by training's loader, the server's bytes path and torchvision's decoder (the nvJPEG
    path's, on the CPU here): were one of them to turn it, a model would be served images turned
    otherwise than it was trained on."""
    from clfpipe.contract.preprocess import decode_to_pixels, load_image, load_pixels
    from clfpipe.runtime.nvjpeg import DevicePreprocessor

    stored = np.zeros((32, 48, 3), np.uint8)
    stored[:, :24] = 255  # left half white: a 90-degree turn would put it on top
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "phone.jpg"
    Image.fromarray(stored).save(path, quality=95, exif=exif)
    assert Image.open(path).getexif()[0x0112] == 6
    assert load_image(path).size == (48, 32)
    spec = PreprocessSpec(resize=32, crop=32)
    pixels = load_pixels([path], spec)[0]
    np.testing.assert_array_equal(decode_to_pixels(np.array([path.read_bytes()], dtype=object), spec)[0], pixels)
    assert pixels[:, :8].mean() > 200 and pixels[:, -8:].mean() < 50  # the white half still on the left
    device = DevicePreprocessor(spec, "cpu").batch([np.array([[path.read_bytes()]], dtype=object)])[0]
    assert device[0, :, :8].mean() > 200 and device[0, :, -8:].mean() < 50
