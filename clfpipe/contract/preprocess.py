"""The one preprocessing spec: training-side evaluation, export folding, the Triton preprocessing
model and the clients all take it from here.

Pixels are produced by Pillow (decode, RGB, resize the shorter side, centre crop) as uint8, then
normalised with the spec's mean/std. Both halves are plain functions, so every consumer computes
bit-identical pixels from the same file. Depends on NumPy and Pillow only: the container
repository ships this file beside its Triton model code.
"""

from __future__ import annotations

import io
import json
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image

# ImageNet statistics: torchvision's pretrained weights were trained with them.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Bounds for decoding untrusted bytes. 64 megapixels decode to 192 MB of RGB; an aspect ratio
# above 16:1 would make the resized image (shorter side to the spec's size) arbitrarily wide.
MAX_PIXELS = 64_000_000
MAX_ASPECT = 16
# The formats the README promises; Pillow would otherwise try ~40 (EPS runs Ghostscript).
FORMATS = ("JPEG", "PNG", "BMP", "WEBP")
ENCODINGS = "JPEG, PNG, BMP or WebP"  # FORMATS, as the errors name them
# Baseline JPEG spends at least a bit on every 8x8 block: fewer bytes than pixels / 512 means a
# header that claims far more pixels than the file holds (libjpeg would fill the rest with grey).
JPEG_MIN_BYTES_PER_PIXEL = 1 / 512

_INTERPOLATIONS = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
}


@dataclass(frozen=True)
class PreprocessSpec:
    """How an image file becomes the model's input tensor."""

    resize: int  # shorter side is scaled to this many pixels
    crop: int  # then a centre crop of crop x crop
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        if self.crop < 8 or self.resize < self.crop:
            raise ValueError(f"expected 8 <= crop <= resize, got crop={self.crop} resize={self.resize}")
        if self.interpolation not in _INTERPOLATIONS:
            raise ValueError(
                f"expected interpolation in {sorted(_INTERPOLATIONS)}, got {self.interpolation!r}"
            )
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"expected 3 mean and 3 std values, got {self.mean} and {self.std}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "PreprocessSpec":
        return cls(
            resize=int(data["resize"]),
            crop=int(data["crop"]),
            mean=tuple(float(v) for v in data["mean"]),  # type: ignore[arg-type]
            std=tuple(float(v) for v in data["std"]),  # type: ignore[arg-type]
            interpolation=str(data["interpolation"]),
        )

    @classmethod
    def for_size(cls, size: int, resize_scale: float = 1.0) -> "PreprocessSpec":
        """fastai's ``sz``: shorter side to round(sz x resize_scale), centre crop sz x sz."""
        return cls(resize=round(size * resize_scale), crop=size)


def check_size(width: int, height: int, max_pixels: int = MAX_PIXELS) -> None:
    """Refuse sizes that are empty, too large, or too elongated to resize within bounds."""
    if width < 1 or height < 1:
        raise ValueError(f"empty image: expected at least 1x1 pixels, got {width}x{height}")
    if width * height > max_pixels:
        raise ValueError(f"image too large: expected at most {max_pixels} pixels, got {width}x{height}")
    if max(width, height) > MAX_ASPECT * min(width, height):
        raise ValueError(f"image too elongated: expected an aspect ratio of at most {MAX_ASPECT}:1, got {width}x{height}")


def open_checked(data: bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Parse the header of encoded bytes (JPEG, PNG, BMP, WebP) and check the size it claims,
    without decoding pixels; ValueError names what is wrong."""
    if not data:
        raise ValueError(f"empty image: expected encoded {ENCODINGS} bytes, got 0 bytes")
    try:
        with warnings.catch_warnings():  # Pillow's own bomb warning: check_size below decides, with our bounds
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.UnidentifiedImageError as exc:
        raise ValueError(f"not an image: expected encoded {ENCODINGS} bytes, got {len(data)} bytes starting {data[:8]!r}") from exc
    except (OSError, Image.DecompressionBombError, SyntaxError, EOFError) as exc:
        raise ValueError(f"not a decodable image: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
    check_size(img.width, img.height, max_pixels)
    if img.format == "JPEG":
        check_jpeg_bytes(img.width, img.height, len(data))
    return img


def check_jpeg_bytes(width: int, height: int, size: int) -> None:
    """Refuse a JPEG header that claims far more pixels than its bytes can hold."""
    if size < width * height * JPEG_MIN_BYTES_PER_PIXEL:
        raise ValueError(f"JPEG header claims {width}x{height} but the file holds {size} bytes, too few "
                         f"for that many pixels (expected at least {int(width * height * JPEG_MIN_BYTES_PER_PIXEL)})")


JPEG_MAGIC = b"\xff\xd8"  # start of image: the first two bytes of every JPEG
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # start-of-frame markers (not DHT, JPG, DAC)
_STANDALONE = frozenset(range(0xD0, 0xD9))  # RSTn, SOI: no length field


def mostly_jpeg(paths: Sequence[str | Path], sample: int = 32) -> bool:
    """Whether at least half of up to ``sample`` of the files, evenly spaced, start as JPEGs do:
    what the training input's ``decode = "auto"`` asks (nvJPEG decodes JPEGs a batch at a time;
    other formats are decoded one by one). A file that cannot be read counts as not a JPEG."""
    if not paths:
        return False
    step = max(1, len(paths) // sample)
    picked = paths[::step][:sample]
    return 2 * sum(_starts_as_jpeg(p) for p in picked) >= len(picked)


def _starts_as_jpeg(path: str | Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(2) == JPEG_MAGIC
    except OSError:
        return False


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's start-of-frame, walking its markers by their lengths up to
    the start of scan (as far as Pillow's header parse reads); None when the bytes are not laid
    out as a JPEG that far. 1.0 ms a batch of 256 photos on the development CPU, where Pillow's
    parse took 6-10 ms (before nvJPEG decodes the batch on the GPU). Every step moves forward: it
    ends on any input."""
    if data[:2] != JPEG_MAGIC:
        return None
    i, n, size = 2, len(data), None
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in _STANDALONE:
            i += 2
            continue
        if marker < 0xC0:  # reserved: not a marker Pillow reads either
            return None
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        if length < 2 or i + 2 + length > n:
            return None
        if marker in _SOF:  # one frame, its length matching its component count, or no vouching
            components = data[i + 9] if length >= 8 else 0
            if size is not None or not 1 <= components <= 4 or length != 8 + 3 * components:
                return None
            size = int.from_bytes(data[i + 7 : i + 9], "big"), int.from_bytes(data[i + 5 : i + 7], "big")
        elif marker == 0xDA:  # start of scan: the header is complete
            return size
        i += 2 + length
    return None


def jpeg_within_bounds(data: bytes, max_pixels: int = MAX_PIXELS) -> bool:
    """The bounds ``open_checked`` puts on a JPEG (size, aspect ratio, bytes for the pixels
    claimed), from ``jpeg_size``: False for anything it cannot vouch for, which then goes
    through ``open_checked`` to be named. Pillow's parse also checks table contents; what passes
    here and fails there is nvJPEG's to decode or to fail (its request alone)."""
    size = jpeg_size(data)
    if size is None:
        return False
    width, height = size
    try:
        check_size(width, height, max_pixels)
        check_jpeg_bytes(width, height, len(data))
    except ValueError:
        return False
    return True


def decode_image(data: bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode encoded image bytes (JPEG, PNG, BMP, WebP) to an RGB PIL image within the size bounds;
    ValueError names what is wrong."""
    img = open_checked(data, max_pixels)
    try:
        img.load()
    except (OSError, Image.DecompressionBombError, SyntaxError, EOFError, ValueError) as exc:
        raise ValueError(f"not a decodable image: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
    return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB for any mode: grayscale, palette, RGBA (alpha dropped), 16-bit."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: scale to 8 bits instead of clipping at 255.
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        img = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8))
    return img.convert("RGB")


def load_image(path: str | Path) -> Image.Image:
    """Read an image file as RGB; ValueError names the file."""
    try:
        data = Path(path).read_bytes()
        return decode_image(data)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: {exc}") from exc


def resized_size(width: int, height: int, spec: PreprocessSpec) -> tuple[int, int]:
    """(width, height) after scaling the shorter side to spec.resize (never below the crop)."""
    scale = spec.resize / min(width, height)
    return max(spec.crop, round(width * scale)), max(spec.crop, round(height * scale))


def center_box(width: int, height: int, crop: int) -> tuple[int, int]:
    """(left, top) of the centred crop x crop box."""
    return (width - crop) // 2, (height - crop) // 2


def resize_crop(img: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """Shorter side to spec.resize, centre crop spec.crop: uint8 HWC."""
    new_w, new_h = resized_size(*img.size, spec)
    img = img.resize((new_w, new_h), _INTERPOLATIONS[spec.interpolation])
    left, top = center_box(new_w, new_h, spec.crop)
    img = img.crop((left, top, left + spec.crop, top + spec.crop))
    return np.asarray(img, dtype=np.uint8)


def load_pixels(files: Sequence[str | Path], spec: PreprocessSpec) -> np.ndarray:
    """Files -> uint8 (N, crop, crop, 3): the spec's resize and crop, before normalisation. Filled in
    place: a list of images stacked at the end held every image twice (3 GB for 10,000 at 224)."""
    out = np.empty((len(files), spec.crop, spec.crop, 3), dtype=np.uint8)
    for i, path in enumerate(files):
        out[i] = resize_crop(load_image(path), spec)
    return out


def normalize(pixels: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """uint8 HWC or NHWC -> float32 CHW or NCHW, scaled to [0, 1] and standardised."""
    x = pixels.astype(np.float32) / np.float32(255.0)
    x = (x - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    return np.ascontiguousarray(np.moveaxis(x, -1, -3))


def preprocess_file(path: str | Path, spec: PreprocessSpec) -> np.ndarray:
    """One file to the model's float32 CHW input."""
    return normalize(load_pixels([path], spec), spec)[0]


def decode_to_pixels(images: Any, spec: PreprocessSpec) -> np.ndarray:
    """A batch of encoded images ((batch,) or (batch, 1) of bytes) -> uint8 (batch, crop, crop, 3).

    ValueError names the bad image by its index, so a server can fail that request alone.
    """
    flat = np.asarray(images, dtype=object).reshape(-1)
    out = np.empty((len(flat), spec.crop, spec.crop, 3), dtype=np.uint8)
    for index, data in enumerate(flat):
        try:
            out[index] = resize_crop(decode_image(bytes(data)), spec)
        except ValueError as exc:
            where = f"image {index} of {len(flat)}: " if len(flat) > 1 else ""
            raise ValueError(f"{where}{exc}") from exc
    return out


def spec_from_parameters(parameters: Mapping[str, Any]) -> PreprocessSpec:
    """The spec from a Triton config's parameters ({key: {"string_value": ...}})."""
    return PreprocessSpec.from_dict(json.loads(parameters["preprocess"]["string_value"]))


def per_request(rows: Any, counts: Sequence[int | ValueError]) -> list[Any]:
    """A dynamic batch's rows (array or tensor) back to its requests: `count` rows for each
    request, or the ValueError that failed it (it has no rows)."""
    results, start = [], 0
    for count in counts:
        if isinstance(count, ValueError):
            results.append(count)
        else:
            results.append(rows[start : start + count])
            start += count
    return results


@dataclass(frozen=True)
class Preprocessor:
    """The Triton preprocessing step; depends on numpy and Pillow only, so the container
    repository can ship this module beside its model.py."""

    spec: PreprocessSpec
    _pool: Any = field(default=None, repr=False, compare=False)

    @classmethod
    def from_parameters(cls, parameters: Mapping[str, Any]) -> "Preprocessor":
        return cls(spec_from_parameters(parameters))

    def __call__(self, images: Any) -> np.ndarray:
        return decode_to_pixels(images, self.spec)

    def batch(self, requests: list[Any]) -> list[np.ndarray | ValueError]:
        """Every image of every request in a dynamic batch at once, on a thread pool (Pillow
        releases the GIL while it decodes and resizes); a bad request yields its ValueError."""
        from concurrent.futures import ThreadPoolExecutor

        if self._pool is None:
            object.__setattr__(self, "_pool", ThreadPoolExecutor(max_workers=os.cpu_count() or 1))
        futures = [self._pool.submit(decode_to_pixels, images, self.spec) for images in requests]
        results: list[np.ndarray | ValueError] = []
        for future in futures:
            try:
                results.append(future.result())
            except ValueError as exc:
                results.append(exc)
        return results

    def close(self) -> None:
        """Release the thread pool (Triton calls the model's finalize)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            object.__setattr__(self, "_pool", None)


@dataclass(frozen=True)
class PixelsPreprocessor:
    """The second input form: clients that hold decoded uint8 HWC RGB pixels skip re-encoding."""

    spec: PreprocessSpec

    @classmethod
    def from_parameters(cls, parameters: Mapping[str, Any]) -> "PixelsPreprocessor":
        return cls(spec_from_parameters(parameters))

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """(batch, H, W, 3) uint8 -> (batch, crop, crop, 3) uint8."""
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"expected uint8 pixels of shape (batch, H, W, 3), got {images.dtype} {images.shape}")
        check_size(images.shape[2], images.shape[1])
        return np.stack([resize_crop(Image.fromarray(img), self.spec) for img in images])
