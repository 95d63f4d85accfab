"""A small deterministic image dataset the project makes itself (no downloads).

Three texture classes, ``horizontal`` and ``vertical`` stripes and ``checker``, each at a random
period, phase, small tilt and pair of colours, with pixel noise and a random occluding disc. An
untrained network is at chance (1/3); resnet34 from scratch learns them within a few CPU
minutes, which shapes on clutter (tried first) did not.
"""

from __future__ import annotations

import contextlib
import io
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw

from clfpipe.contract.errors import DataError
from clfpipe.contract.recipe import MAX_SEED

CLASSES = ("checker", "horizontal", "vertical")


@dataclass(frozen=True)
class DemoSpec:
    train_per_class: int = 120
    valid_per_class: int = 30
    image_size: int = 96
    jpeg_quality: int = 90


def _wave(label: str, u: np.ndarray, v: np.ndarray, *, period: float, phase: float) -> np.ndarray:
    if label == "horizontal":
        return np.sin(2 * math.pi * v / period + phase)
    if label == "vertical":
        return np.sin(2 * math.pi * u / period + phase)
    return np.sin(2 * math.pi * u / period + phase) * np.sin(2 * math.pi * v / period + phase)


def draw_example(rng: np.random.Generator, label: str, size: int) -> Image.Image:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    period, phase, tilt = rng.uniform(8, 20), rng.uniform(0, 2 * math.pi), rng.uniform(-0.25, 0.25)
    u = xx * math.cos(tilt) + yy * math.sin(tilt)
    v = -xx * math.sin(tilt) + yy * math.cos(tilt)
    t = (np.sign(_wave(label, u, v, period=period, phase=phase)) * 0.5 + 0.5)[..., None]
    a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    pixels = a * (1 - t) + b * t + rng.normal(0.0, 20.0, (size, size, 3))
    img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    r = rng.uniform(0.1, 0.25) * size
    cx, cy = rng.uniform(0, size, 2)
    ImageDraw.Draw(img).ellipse((cx - r, cy - r, cx + r, cy + r), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    return img


@contextlib.contextmanager
def _writing_to(out: Path) -> Iterator[None]:
    """An OSError while writing (a read-only folder, a full disk) as one line naming the folder."""
    try:
        yield
    except OSError as exc:
        raise DataError(f"cannot write the demo dataset to {out}: {exc.strerror or exc}") from exc


def _check_own(out: Path, written: re.Pattern[str]) -> None:
    """OUT is new, or holds only files a demo dataset of this kind names (`written`, matched against
    paths relative to OUT): demo images written into a folder of the user's would mix with its data."""
    if not out.is_dir():
        return
    for path in out.rglob("*"):
        if path.is_file() and not written.fullmatch(path.relative_to(out).as_posix()):
            raise DataError(f"{out} holds files the demo dataset does not (such as {path.relative_to(out)}): expected a new "
                            "folder or one with a demo dataset; nothing was written")


_SINGLE_FILES = re.compile(rf"(train|valid)/({'|'.join(CLASSES)})/\2_\d{{4}}\.jpg")


def check_seed(seed: int) -> None:
    """The demo's seed within the recipe's bounds for a seed: -1 was numpy's ValueError traceback."""
    if not 0 <= seed <= MAX_SEED:
        raise DataError(f"--seed: expected 0 to {MAX_SEED}, got {seed}")


def write_demo_dataset(out_dir: str | Path, seed: int = 0, spec: DemoSpec = DemoSpec()) -> dict[str, int]:
    """Write OUT/train/<class>/*.jpg and OUT/valid/<class>/*.jpg (OUT new, or a demo dataset's:
    ``_check_own``); returns counts per split."""
    check_seed(seed)
    out = Path(out_dir)
    _check_own(out, _SINGLE_FILES)
    rng = np.random.default_rng(seed)
    counts = {"train": 0, "valid": 0}
    with _writing_to(out):
        for split, per_class in (("train", spec.train_per_class), ("valid", spec.valid_per_class)):
            for label in CLASSES:
                folder = out / split / label
                folder.mkdir(parents=True, exist_ok=True)
                for i in range(per_class):
                    draw_example(rng, label, spec.image_size).save(folder / f"{label}_{i:04d}.jpg", quality=spec.jpeg_quality)
                    counts[split] += 1
    return counts


TAGS = ("disc", "horizontal", "vertical")
LABELS_CSV = "labels.csv"


def draw_tagged(rng: np.random.Generator, size: int) -> tuple[Image.Image, tuple[str, ...]]:
    """Multi-label example: horizontal and/or vertical stripes (both: a grid), maybe a disc."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    period, phase = rng.uniform(8, 20), rng.uniform(0, 2 * math.pi)
    texture = ("horizontal", "vertical", "both")[int(rng.integers(0, 3))]
    mask = np.zeros((size, size), dtype=bool)
    if texture in ("horizontal", "both"):
        mask |= np.sin(2 * math.pi * yy / period + phase) > 0.3
    if texture in ("vertical", "both"):
        mask |= np.sin(2 * math.pi * xx / period + phase) > 0.3
    a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    pixels = np.where(mask[..., None], b, a) + rng.normal(0.0, 15.0, (size, size, 3))
    img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    tags = {"horizontal", "vertical"} if texture == "both" else {texture}
    if rng.random() < 0.5:
        r = rng.uniform(0.12, 0.25) * size
        cx, cy = rng.uniform(r, size - r, 2)
        ImageDraw.Draw(img).ellipse((cx - r, cy - r, cx + r, cy + r), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        tags.add("disc")
    return img, tuple(sorted(tags))


def write_demo_multilabel(out_dir: str | Path, seed: int = 0, *, train: int = 240, valid: int = 60, image_size: int = 96) -> dict[str, int]:
    """Planet-style layout: OUT/train/*.jpg, OUT/valid/*.jpg and OUT/labels.csv (image,tags), OUT
    new or a demo dataset's (``_check_own``)."""
    check_seed(seed)
    out = Path(out_dir)
    _check_own(out, re.compile(rf"(train|valid)/\1_\d{{4}}\.jpg|{re.escape(LABELS_CSV)}"))
    rng = np.random.default_rng(seed)
    rows = ["image,tags"]
    with _writing_to(out):
        for split, count in (("train", train), ("valid", valid)):
            (out / split).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                img, tags = draw_tagged(rng, image_size)
                name = f"{split}_{i:04d}"
                img.save(out / split / f"{name}.jpg", quality=90)
                rows.append(f"{name},{' '.join(tags)}")
        (out / LABELS_CSV).write_text("\n".join(rows) + "\n")
    return {"train": train, "valid": valid}


def detailed_image(seed: int, size: int) -> Image.Image:
    """A random colour field with detail at every scale of a 12-cell grid: a stand-in for distinct
    photos, unlike the demo's stripes of one kind a class (the near-copy tests draw these)."""
    coarse = np.random.default_rng(seed).integers(0, 256, (12, 12, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((size, size), Image.BICUBIC)


def write_format_samples(out_dir: str | Path, seed: int = 3) -> list[Path]:
    """One small file per format and mode a user's folder may hold, among those training reads:
    JPEG (RGB, grey, CMYK, progressive), PNG (16-bit grey, RGBA, palette), BMP, WebP."""
    rng = np.random.default_rng(seed)
    rgb = Image.fromarray(rng.integers(0, 256, (21, 34, 3), dtype=np.uint8))
    made = {
        "rgb.jpg": (rgb, {}),
        "grey.jpg": (rgb.convert("L"), {}),
        "cmyk.jpg": (rgb.convert("CMYK"), {}),
        "progressive.jpg": (rgb, {"progressive": True}),
        "grey16.png": (Image.fromarray(rng.integers(0, 65536, (21, 34), dtype=np.uint16)), {}),
        "rgba.png": (rgb.convert("RGBA"), {}),
        "palette.png": (rgb.convert("P"), {}),
        "image.bmp": (rgb, {}),
        "image.webp": (rgb, {"lossless": True}),
    }
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    for name, (img, options) in made.items():
        img.save(Path(out_dir) / name, **options)
    return [Path(out_dir) / name for name in made]


def damaged_jpegs(count: int, seed: int = 0) -> list[bytes]:
    """JPEGs of 80x60 noise, each with one byte of its scan changed and its end cut off: what a
    failing disk or a partial download leaves. Decoders disagree on some of them (about 3% are
    read whole by Pillow and refused by torchvision's decoder)."""
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)).save(buf, format="JPEG")
    whole = buf.getvalue()
    scan = whole.find(b"\xff\xda") + 20
    out = []
    for _ in range(count):
        damaged = bytearray(whole)
        damaged[int(rng.integers(scan, len(whole)))] = int(rng.integers(0, 256))
        out.append(bytes(damaged[: int(rng.integers(scan, len(whole)))]))
    return out
