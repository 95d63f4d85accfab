"""Untrusted image bytes: random and mutated inputs give valid pixels or one ValueError line, never
a traceback, a hang or unbounded memory; each reported attack is refused by name."""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from clfpipe.contract.preprocess import (
    MAX_PIXELS,
    PixelsPreprocessor,
    PreprocessSpec,
    decode_to_pixels,
    jpeg_size,
    jpeg_within_bounds,
    open_checked,
)

SPEC = PreprocessSpec(40, 32)


def _encode(fmt: str, size=(24, 20), mode="RGB") -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, (size[1], size[0], 3 if mode == "RGB" else 1), dtype=np.uint8).squeeze()
    Image.fromarray(array).save(buf, format=fmt)
    return buf.getvalue()


SEEDS = {fmt: _encode(fmt) for fmt in ("JPEG", "PNG", "BMP", "WEBP")}


def _one(data: bytes) -> np.ndarray | ValueError:
    try:
        out = decode_to_pixels(np.array([[data]], dtype=object), SPEC)
    except ValueError as exc:
        assert str(exc) and "\n" not in str(exc), repr(str(exc))
        return exc
    assert out.shape == (1, 32, 32, 3) and out.dtype == np.uint8
    return out


@settings(max_examples=300, deadline=3000, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=3000))
def test_random_bytes(data):
    _one(data)


@settings(max_examples=400, deadline=3000, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(sorted(SEEDS)), st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=8),
       st.one_of(st.none(), st.integers(0, 3000)))
def test_mutated_images(fmt, flips, cut):
    data = bytearray(SEEDS[fmt])
    for position, value in flips:
        data[position % len(data)] = value
    _one(bytes(data[:cut] if cut is not None else data))


def _with_jpeg_size(width: int, height: int) -> bytes:
    data = bytearray(SEEDS["JPEG"])
    sof = data.find(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def _png(width: int, height: int, rows: bytes | None = None) -> bytes:
    """A PNG whose IHDR says width x height (8-bit grey); rows default to the right amount of zeros."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    raw = rows if rows is not None else b"".join(b"\x00" + bytes(width) for _ in range(height))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)) \
        + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


@settings(max_examples=200, deadline=5000, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 65535), st.integers(0, 65535))
def test_headers_that_lie_about_the_size(width, height):
    data = _with_jpeg_size(width, height)
    result = _one(data)
    if width * height > len(data) * 512:  # far more pixels than a JPEG of this size can hold
        assert isinstance(result, ValueError)


@pytest.mark.parametrize("data, message", [
    (_png(100_000, 1), "image too elongated: expected an aspect ratio of at most 16:1, got 100000x1"),
    (_with_jpeg_size(7999, 7999), "JPEG header claims 7999x7999 but the file holds"),
    (_png(9000, 9000, rows=b""), "image too large"),
    (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", "not an image"),
    (b"GIF89a" + bytes(20), "not an image"),
])
def test_each_reported_attack_is_refused_by_name(data, message):
    result = _one(data)
    assert isinstance(result, ValueError) and message in str(result), result


def test_pixel_input_with_a_zero_side_is_an_error():
    for shape in ((1, 0, 5, 3), (1, 5, 0, 3), (1, 1, 200, 3)):
        with pytest.raises(ValueError, match="empty image|too elongated"):
            PixelsPreprocessor(SPEC)(np.zeros(shape, np.uint8))


def test_decoding_the_attacks_stays_within_bounded_memory(tmp_path):
    """The reported attacks in a fresh process: its peak RSS stays far below what they once cost (1.5 GB)."""
    cases = tmp_path / "cases.json"
    cases.write_text(json.dumps([_png(100_000, 1).hex(), _with_jpeg_size(7999, 7999).hex(), _png(4000, 4000).hex()]))
    code = (
        "import json, resource, sys, numpy as np\n"
        "from clfpipe.contract.preprocess import PreprocessSpec, decode_to_pixels\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "for h in json.load(open(sys.argv[1])):\n"
        "    try: decode_to_pixels(np.array([[bytes.fromhex(h)]], dtype=object), PreprocessSpec(224, 224))\n"
        "    except ValueError: pass\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) // 1024)\n"
    )
    grown_mb = int(subprocess.run([sys.executable, "-c", code, str(cases)], capture_output=True, text=True, check=True).stdout)
    assert grown_mb < 200, f"decoding grew the process by {grown_mb} MB"
    assert 4000 * 4000 <= MAX_PIXELS  # the legitimate 16-megapixel image above was decoded, not refused


def _pillow_jpeg_bounds(data: bytes) -> bool:
    try:
        img = open_checked(data)
    except ValueError:
        return False
    return img.format == "JPEG"


@settings(max_examples=400, deadline=3000, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.binary(max_size=600), st.binary(max_size=600).map(lambda b: b"\xff\xd8" + b)),
       st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=8), st.one_of(st.none(), st.integers(0, 3000)))
def test_the_jpeg_header_scan_ends_on_any_bytes_and_vouches_only_within_the_bounds(noise, flips, cut):
    """``jpeg_size`` walks markers by their lengths: any input ends with a size or None; where
    Pillow reads the header too, the sizes agree; what ``jpeg_within_bounds`` vouches for is
    within the Pillow path's bounds (nvJPEG then decodes it, or fails it alone)."""
    mutated = bytearray(SEEDS["JPEG"])
    for position, value in flips:
        mutated[position % len(mutated)] = value
    for data in (noise, bytes(mutated[:cut] if cut is not None else mutated)):
        size = jpeg_size(data)
        assert size is None or (isinstance(size, tuple) and all(0 <= v <= 65535 for v in size))
        if size is not None and _pillow_jpeg_bounds(data):
            assert Image.open(io.BytesIO(data)).size == size
        if jpeg_within_bounds(data):
            width, height = size
            assert 1 <= width * height <= MAX_PIXELS and len(data) * 512 >= width * height
            assert max(width, height) <= 16 * min(width, height)


@pytest.mark.parametrize("width, height, fits", [(24, 20, True), (7999, 7999, False), (1000, 10, False), (0, 20, False)])
def test_the_jpeg_header_scan_applies_the_pillow_paths_bounds(width, height, fits):
    data = _with_jpeg_size(width, height)
    assert jpeg_size(data) == (width, height)
    assert jpeg_within_bounds(data) is fits is _pillow_jpeg_bounds(data)
    for fmt in ("PNG", "BMP", "WEBP"):
        assert jpeg_size(SEEDS[fmt]) is None and not jpeg_within_bounds(SEEDS[fmt])
