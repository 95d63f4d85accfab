"""The one transforms factory for training images, on Pillow images (loader workers) or on
decoded uint8 CHW tensors (on the training device: nvJPEG on CUDA), after timm's
``transforms_factory`` with its prefetcher switch.

Both paths draw each image's parameters with ``contract.augment.sample`` and apply them with the
same torchvision ``v2.functional`` calls, which take Pillow images and tensors alike; without
augmentation both give the spec's evaluation pixels (``contract.preprocess.resize_crop``).
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Sequence, TypeVar

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from clfpipe.contract.augment import DRAWS, AugmentParams, AugmentPolicy, Draws, from_unit, sample, scaled_crop
from clfpipe.contract.errors import DataError, first_line
from clfpipe.contract.preprocess import JPEG_MAGIC, PreprocessSpec, center_box, resize_crop, resized_size
from clfpipe.contract.preprocess import decode_image as pil_decode

Img = TypeVar("Img", Image.Image, torch.Tensor)
log = logging.getLogger(__name__)


def torch_draws(generator: torch.Generator | None = None) -> Draws:
    """draws(n) from a torch generator (None: the global one, which DataLoader seeds per worker)."""
    return lambda n: torch.rand(n, generator=generator, dtype=torch.float64).tolist()


def sample_batch(policy: AugmentPolicy, n: int, generator: torch.Generator) -> list[AugmentParams]:
    """n images' parameters from one (n, DRAWS) draw: the values ``sample`` gives image by image
    from the same generator."""
    if not policy.random:
        return [AugmentParams()] * n
    return [from_unit(policy, row) for row in torch.rand(n, DRAWS, generator=generator, dtype=torch.float64).tolist()]


def _size(img: Image.Image | torch.Tensor) -> tuple[int, int]:
    """(height, width)."""
    return (img.height, img.width) if isinstance(img, Image.Image) else (int(img.shape[-2]), int(img.shape[-1]))


def _rot90(img: Img) -> Img:
    if isinstance(img, Image.Image):
        return img.transpose(Image.Transpose.ROTATE_90)
    return torch.rot90(img, 1, dims=(-2, -1))


def apply(img: Img, params: AugmentParams, spec: PreprocessSpec) -> Img:
    """One image's drawn augmentation: zoomed random crop to crop x crop, then rotation, lighting
    and flips. Pillow image in, Pillow image out; uint8 CHW tensor in, uint8 tensor out."""
    img = _scaled_crop(img, params, spec)
    if params.angle:
        img = TF.rotate(img, params.angle)
    if params.brightness != 1.0:
        img = TF.adjust_brightness(img, params.brightness)
    if params.contrast != 1.0:
        img = TF.adjust_contrast(img, params.contrast)
    if params.hflip:
        img = TF.horizontal_flip(img)
    if params.vflip:
        img = TF.vertical_flip(img)
    if params.rot90:
        img = _rot90(img)
    return img


def _rotation_grid(angles: torch.Tensor, size: int) -> torch.Tensor:
    """grid_sample grids that turn square size x size images by `angles` degrees counter-clockwise
    about their centres: torchvision's ``rotate`` (its inverse affine matrix and pixel-centre
    grid), one grid per image."""
    rad = torch.deg2rad(-angles.double())
    cos, sin, zero = torch.cos(rad), torch.sin(rad), torch.zeros_like(rad)
    theta = torch.stack([cos, sin, zero, -sin, cos, zero], 1).view(-1, 2, 3).float()
    steps = torch.linspace(-size * 0.5 + 0.5, size * 0.5 - 0.5, steps=size, device=angles.device)
    base = torch.stack([steps.expand(size, size), steps.view(-1, 1).expand(size, size), torch.ones(size, size, device=angles.device)], -1)
    scaled = theta.transpose(1, 2) / (0.5 * size)
    return base.view(1, size * size, 3).expand(len(angles), -1, -1).bmm(scaled).view(-1, size, size, 2)


def apply_batch(images: list[torch.Tensor], params: list[AugmentParams], spec: PreprocessSpec) -> torch.Tensor:
    """``apply`` for a batch of uint8 CHW tensors on one device, each with its own draw: the zoomed
    crops as one resampling per padded size (``crop_batch``), then the rest as batched ops -> uint8."""
    return augment_crops(crop_batch(images, params, spec), params, spec.crop).to(torch.uint8)


def _filter_taps(in_sizes: torch.Tensor, out_sizes: torch.Tensor, starts: torch.Tensor, count: int,
                 taps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An antialiased bilinear resize from each in_size to its out_size, output pixels start ..
    start + count: each output pixel's ``taps`` source pixels (n, count, taps) and their weights
    (float32, zero past the image's end), ATen's ``_compute_indices_min_size_weights_aa`` (the
    filter Pillow and ``TF.resize(antialias=True)`` use); ``_rows`` makes them matrices. Computed
    over every source pixel, a float64 (n, count, padded) tensor a step, they took more time than
    the resampling they are for (this CPU: 410 of 637 ms for 64 photos at 224)."""
    device = out_sizes.device
    in_sizes = in_sizes.double().view(-1, 1, 1)
    scale = in_sizes / out_sizes.double().view(-1, 1, 1)  # input pixels per output pixel
    support = torch.where(scale >= 1.0, scale, torch.ones_like(scale))
    invscale = torch.where(scale >= 1.0, 1.0 / scale, torch.ones_like(scale))
    center = scale * (starts.view(-1, 1, 1) + torch.arange(count, device=device).view(1, -1, 1) + 0.5)
    lo = (center - support + 0.5).trunc().clamp(min=0)
    hi = torch.minimum((center + support + 0.5).trunc(), in_sizes)
    source = lo + torch.arange(taps, device=device, dtype=torch.float64).view(1, 1, -1)  # distinct in a row
    weights = (1.0 - ((source - center + 0.5) * invscale).abs()).clamp(min=0) * (source < hi)
    return source.long(), (weights / weights.sum(-1, keepdim=True)).float()


def _rows(source: torch.Tensor, weights: torch.Tensor, padded: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``_filter_taps``' weights placed in (n, count, padded) rows of `dtype`, zero beyond the image
    (its padding); taps past the image's end (weight 0) land in the extra columns, which are then
    dropped. Each place takes one weight, so rounding the weights first is rounding the rows."""
    n, count, taps = weights.shape
    rows = torch.zeros(n, count, padded + taps, device=weights.device, dtype=dtype)
    return rows.scatter_(2, source, weights.to(dtype))[..., :padded]


def _taps(in_size: int, out_size: int) -> int:
    """Source pixels an output pixel of that resize can read: the filter's support (the scale
    when shrinking, 1 when enlarging) each side, whole pixels, and one for the truncation."""
    return math.ceil(2 * max(in_size / out_size, 1.0)) + 2


_CHUNK_ELEMENTS = 1 << 28  # float pixels a resampling holds at once (1 GiB): a batch of large photos is split
_BUCKET = 32  # images whose sides round up to the same multiple of this many pixels are resampled together


def _bucket(height: int, width: int) -> tuple[int, int]:
    return -(-height // _BUCKET) * _BUCKET, -(-width // _BUCKET) * _BUCKET


def _padded(images: list[torch.Tensor], height: int, width: int, dtype: torch.dtype) -> torch.Tensor:
    """(n, 3, height, width) of `dtype`, each image in its top-left corner, zeros around it."""
    if all(_size(img) == (height, width) for img in images):
        return torch.stack(images).to(dtype)
    out = images[0].new_zeros((len(images), 3, height, width), dtype=dtype)
    for slot, img in zip(out, images):
        slot[:, : img.shape[-2], : img.shape[-1]] = img
    return out


# The resampling's products on tensor cores in half precision on CUDA: the pixels (whole levels up
# to 255) are exact in it and the weights keep 11 bits; against float64, a result of noise images
# was off by 0.04 of a level on average and 0.23 at most before rounding, and 5% of them rounded to
# the next level. In float32 the products ran on the GPU's slower float32 units, 80 GFLOP a batch
# of 256 photos at 224. The CPU has no fast half products.
_RESAMPLE_DTYPE = {"cuda": torch.float16}


def resample_dtype(device: torch.device) -> torch.dtype:
    return _RESAMPLE_DTYPE.get(device.type, torch.float32)


def _resample(stacked: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """rows @ image @ cols^T for each image and channel of (n, 3, H, W), as two batched products
    over views: no operand is broadcast over the channels (which copied it three times). The
    columns first, into (n, crop, 3H); then the rows, into (n, crop_w, 3, crop_h), returned as
    a (n, 3, crop_h, crop_w) view."""
    n, _, height, width = stacked.shape
    crop_w, crop_h = cols.shape[1], rows.shape[1]
    by_column = torch.bmm(cols, stacked.view(n, 3 * height, width).transpose(1, 2))  # (n, crop_w, 3H)
    out = torch.bmm(by_column.view(n, crop_w * 3, height), rows.transpose(1, 2))  # (n, crop_w * 3, crop_h)
    return out.view(n, crop_w, 3, crop_h).permute(0, 2, 3, 1)


def crop_batch(images: list[torch.Tensor], params: list[AugmentParams], spec: PreprocessSpec,
               dtype: torch.dtype | None = None, memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """The zoomed crops (``_scaled_crop``: resize, then the crop x crop window) of a batch, as float32
    NCHW of whole levels in `memory_format`: the window's rows and columns of each image's
    antialiased resize as two batched matrix products over images padded to a common size
    (``_BUCKET``), in `dtype` (default ``resample_dtype``). Resize-then-crop image by image took most
    of a batch's input time on an H200 (35 ms for 256 images); a pair of products per distinct size
    made about as many ops as images for photos of many sizes. The filter's taps are computed once
    a batch and only placed per padded size. The products are rounded to levels in their own dtype
    (whole levels are exact in float16: half the bytes) and made float32 in `memory_format` by the
    copy that puts them in place. Equal to ``_scaled_crop`` up to a level."""
    device, n, crop = images[0].device, len(images), spec.crop
    dtype = dtype or resample_dtype(device)
    sizes = [_size(img) for img in images]
    # per image: height, width, then scaled_crop's new_h, new_w, top, left
    scaled = [scaled_crop(h, w, p, resize=spec.resize, crop=crop) for (h, w), p in zip(sizes, params)]
    groups: dict[tuple[int, int], list[int]] = {}
    for i, (h, w) in enumerate(sizes):
        groups.setdefault(_bucket(h, w), []).append(i)
    table = to_device(torch.tensor([[h, w, *box] for (h, w), box in zip(sizes, scaled)]), device)  # one copy a batch
    row_taps = max(_taps(h, box[0]) for (h, _), box in zip(sizes, scaled))
    col_taps = max(_taps(w, box[1]) for (_, w), box in zip(sizes, scaled))
    row_filter = _filter_taps(table[:, 0], table[:, 2], table[:, 4], crop, row_taps)
    col_filter = _filter_taps(table[:, 1], table[:, 3], table[:, 5], crop, col_taps)
    # the images' indices group after group, one copy a batch; all of them in order when one size
    order = (torch.arange(n, device=device) if len(groups) == 1 else
             to_device(torch.tensor([i for members in groups.values() for i in members]), device))
    out = torch.empty(n, 3, crop, crop, device=device, memory_format=memory_format)
    first = 0
    for (height, width), members in groups.items():
        index = order[first : first + len(members)]
        first += len(members)
        rows = _rows(*_take(row_filter, index, len(groups)), height, dtype)
        cols = _rows(*_take(col_filter, index, len(groups)), width, dtype)
        step = max(1, _CHUNK_ELEMENTS // (3 * height * width))
        for start in range(0, len(members), step):
            part = slice(start, start + step)
            stacked = _padded([images[i] for i in members[part]], height, width, dtype)
            levels = _resample(stacked, rows[part], cols[part]).round_().clamp_(0, 255)
            if len(members) == n <= step:  # the whole batch, in order, at once: one pass makes it float32 in place
                return out.copy_(levels)
            out.index_copy_(0, index[part], levels.to(out.dtype))
    return out


def _take(filter_taps: tuple[torch.Tensor, torch.Tensor], index: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A group's rows of a batch's ``_filter_taps``: all of them, in order, when the batch is one group."""
    source, weights = filter_taps
    return filter_taps if groups == 1 else (source[index], weights[index])


_DRAWN = ("angle", "brightness", "contrast", "hflip", "vflip", "rot90")  # augment_crops' columns


def to_device(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor on the device without waiting for it: pinned, then copied
    asynchronously on the current stream. ``torch.tensor(..., device="cuda")`` from pageable
    memory blocks the host until that stream's queued work is done: six times a batch, the
    augmentation thread waited on its own kernels."""
    if device.type != "cuda":
        return values.to(device)
    return values.pin_memory().to(device, non_blocking=True)


def augment_crops(crops: torch.Tensor, params: list[AugmentParams], size: int) -> torch.Tensor:
    """Rotation, lighting and flips of float NCHW crops of whole levels, batched, each image's
    drawn values one column of a table copied once -> a new float NCHW of whole levels. Equal to
    ``apply``'s steps after its crop up to a level where float sums round differently (per-image
    ops took 0.7 ms an image on an H200). Each pass over the batch is one on the GPU's memory, so
    the passes are few: the brightness first (it makes the new tensor, and commutes with the turn:
    both keep black black, and a nearest-pixel turn only moves pixels), the turn in place on it,
    each blend as one fused product and sum; a turn or flip touches only the images that drew it."""
    n, device = len(params), crops.device
    table = to_device(torch.tensor([[float(getattr(p, name)) for name in _DRAWN] for p in params]), device)
    column = {name: table[:, i].view(n, 1, 1, 1) for i, name in enumerate(_DRAWN)}
    crops = (crops * column["brightness"]).clamp_(0, 255).floor_()  # torchvision's blend with black
    if (index := _drew(params, "angle", device)) is not None:  # the unturned keep their pixels exactly
        crops.index_copy_(0, index, torch.nn.functional.grid_sample(
            crops[index], _rotation_grid(table[index, 0], size), mode="nearest", padding_mode="zeros", align_corners=False))
    gray = (crops[:, 0] * 0.2989 + crops[:, 1] * 0.587 + crops[:, 2] * 0.114).floor_()
    contrast, mean = column["contrast"], gray.mean(dim=(-2, -1)).view(n, 1, 1, 1)
    crops = torch.addcmul(mean * (1.0 - contrast), crops, contrast).clamp_(0, 255).floor_()  # torchvision's blend with the mean
    for name, change in _FLIPS:
        if (index := _drew(params, name, device)) is not None:
            crops[index] = change(crops[index])
    return crops


_FLIPS = (("hflip", lambda x: x.flip(-1)), ("vflip", lambda x: x.flip(-2)), ("rot90", lambda x: torch.rot90(x, 1, dims=(-2, -1))))


def _drew(params: list[AugmentParams], name: str, device: torch.device) -> torch.Tensor | None:
    """The indices of the images whose draw has `name` set, on the device; None when none has."""
    chosen = [i for i, p in enumerate(params) if getattr(p, name)]
    return to_device(torch.tensor(chosen), device) if chosen else None


def _scaled_crop(img: Img, params: AugmentParams, spec: PreprocessSpec) -> Img:
    """The zoomed random crop: scaled by ``scaled_crop``'s factor, then its crop x crop window."""
    new_h, new_w, top, left = scaled_crop(*_size(img), params, resize=spec.resize, crop=spec.crop)
    return TF.crop(TF.resize(img, [new_h, new_w], antialias=True), top, left, spec.crop, spec.crop)


def eval_pixels(img: torch.Tensor, spec: PreprocessSpec) -> torch.Tensor:
    """The spec's evaluation pixels of a uint8 CHW tensor (or NCHW batch of one size): ``resize_crop``'s steps on the device."""
    height, width = _size(img)
    new_w, new_h = resized_size(width, height, spec)
    img = TF.resize(img, [new_h, new_w], antialias=True)
    left, top = center_box(new_w, new_h, spec.crop)
    return img[..., top : top + spec.crop, left : left + spec.crop]


def train_pixels(img: Img, policy: AugmentPolicy, spec: PreprocessSpec, draws: Draws) -> Img:
    """The training transform: a drawn augmentation, or the evaluation pixels without one."""
    if policy.random:
        return apply(img, sample(policy, draws), spec)
    if isinstance(img, Image.Image):
        return Image.fromarray(resize_crop(img, spec))
    return eval_pixels(img, spec)


def train_pixels_batch(images: list[torch.Tensor], policy: AugmentPolicy, spec: PreprocessSpec,
                       generator: torch.Generator, resample: torch.dtype | None = None,
                       memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """``train_pixels`` for a batch of decoded tensors on one device: (N, 3, crop, crop) float32
    of whole levels in `memory_format` (``normalize_batch`` takes them as they are: no uint8 copy in
    between, and its result keeps their layout), each image's parameters the ones the one-by-one
    path draws from the same generator; `resample`: ``crop_batch``'s dtype."""
    if policy.random:
        params = sample_batch(policy, len(images), generator)
        return augment_crops(crop_batch(images, params, spec, resample, memory_format), params, spec.crop)
    return torch.stack([eval_pixels(img, spec) for img in images]).to(torch.float32, memory_format=memory_format)


def normalize_batch(pixels: torch.Tensor, spec: PreprocessSpec) -> torch.Tensor:
    """uint8 NCHW (or float32 of whole levels) -> float32 NCHW standardised with the spec's
    mean/std, on the same device: (x / 255 - mean) / std as one pass, x * scale + shift."""
    scale = [1.0 / (255.0 * s) for s in spec.std]
    shift = [-m / s for m, s in zip(spec.mean, spec.std)]
    table = to_device(torch.tensor([scale, shift]), pixels.device).view(2, 1, 3, 1, 1)
    return torch.addcmul(table[1], pixels.float(), table[0])


def is_jpeg(data: bytes | torch.Tensor) -> bool:
    head = bytes(data[:2].tolist()) if isinstance(data, torch.Tensor) else data[:2]
    return head == JPEG_MAGIC


def decode_batch(encoded: list[torch.Tensor], device: torch.device, names: Sequence[str | Path] | None = None) -> list[torch.Tensor]:
    """Encoded images (uint8 tensors of file bytes) -> uint8 RGB CHW tensors on the device: the
    JPEGs in one batched call (nvJPEG on CUDA); other formats, and a batch that call refuses, one
    by one on the host as the Pillow path and the server decode them (``host_decode``). An image
    the host cannot decode either is a DataError naming it (``names``: one per image, its file)."""
    jpegs = [i for i, e in enumerate(encoded) if is_jpeg(e)]
    decoded: dict[int, torch.Tensor] = {}
    refused: RuntimeError | None = None
    if jpegs:
        try:
            decoded = dict(zip(jpegs, decode_jpeg([encoded[i] for i in jpegs], mode=ImageReadMode.RGB, device=device)))
        except RuntimeError as exc:  # its error names no image: the host finds which, or decodes them all
            refused = exc
    images = [decoded[i] if i in decoded else _on_host(encoded, i, names).to(device) for i in range(len(encoded))]
    if refused is not None:  # only once the host has decoded them all: else the error naming the file says it
        log.warning("the %s JPEG decoder refused a batch of %d images that the host decodes (%s): decoded there",
                    device.type, len(jpegs), _reason(refused))
    return images


def host_decode(data: torch.Tensor) -> torch.Tensor:
    """One encoded image -> uint8 RGB CHW on the host, as the Pillow path and the server read it
    (``contract.preprocess.decode_image``: torchvision's decoders keep a 16-bit PNG's uint16
    levels, read no BMP, and refuse some damaged JPEGs that Pillow reads whole). ValueError says why not."""
    return torch.from_numpy(np.array(pil_decode(data.numpy().tobytes()))).permute(2, 0, 1).contiguous()


def _on_host(encoded: list[torch.Tensor], index: int, names: Sequence[str | Path] | None) -> torch.Tensor:
    try:
        return host_decode(encoded[index])
    except ValueError as exc:
        what = f"image file {names[index]}" if names is not None else f"image #{index} of the batch"
        raise DataError(f"corrupt {what}: {exc}") from exc


def _reason(exc: Exception) -> str:
    """The error's first line, without torchvision's source location ("decode_jpeg, .../decode_jpeg.cpp:171, ")."""
    return re.sub(r"^.*\.cpp:\d+,\s*", "", first_line(exc))
