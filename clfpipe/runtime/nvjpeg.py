"""JPEG bytes to the spec's pixels on a torch device: every JPEG of a dynamic batch decoded by
nvJPEG in one call (on CUDA), resized and cropped there (``clfpipe.nn.transforms.eval_pixels``),
images of one size resized together.

Two uses: the served preprocessing step (``batch``: uint8 (crop, crop, 3) pixels back on the host,
like ``contract.preprocess.Preprocessor``), and the fused step that decodes and runs the backbone
on the same device (``decode``: the pixels stay there).

Decoder and resampler differ from Pillow's, so pixels differ by a few levels from the Pillow path
that training evaluation uses; ``serve.decode = "pil"`` keeps them identical.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_image, decode_jpeg

from clfpipe.contract.preprocess import PreprocessSpec, jpeg_within_bounds, open_checked, per_request
from clfpipe.nn.transforms import eval_pixels, is_jpeg

Decoded = tuple[torch.Tensor | None, list[int | ValueError]]


def _tensors(items: list[bytes]) -> list[torch.Tensor]:
    """uint8 tensors over the bytes themselves: no copy (a bytearray copy cost 10 ms per 256 photos);
    the decoder only reads them, so torch's warning about read-only memory does not apply."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return [torch.frombuffer(data, dtype=torch.uint8) for data in items]


def _flatten(requests: list) -> list[tuple[int, bytes]]:
    return [(r, bytes(d)) for r, images in enumerate(requests) for d in np.asarray(images, dtype=object).reshape(-1)]


class DevicePreprocessor:
    def __init__(self, spec: PreprocessSpec, device: str | torch.device = "cuda") -> None:
        self.spec, self.device = spec, torch.device(device)

    def _decode_one(self, data: bytes) -> torch.Tensor:
        open_checked(data).close()  # the formats and size bounds of the Pillow path, from the header
        try:
            (tensor,) = _tensors([data])
            if is_jpeg(data):
                return decode_jpeg(tensor, mode=ImageReadMode.RGB, device=self.device)
            return decode_image(tensor, mode=ImageReadMode.RGB).to(self.device)
        except RuntimeError as exc:
            raise ValueError(f"not a decodable image: {str(exc).splitlines()[0]}") from exc

    def _decoded(self, flat: list[tuple[int, bytes]]) -> dict[int, torch.Tensor]:
        """The common case: one nvJPEG call for every JPEG of the batch; {} when one of them fails."""
        # by the JPEG's own header: what it cannot vouch for is decoded one by one, where
        # open_checked's error reaches its request
        jpegs = [i for i, (_, d) in enumerate(flat) if jpeg_within_bounds(d)]
        if not jpegs:
            return {}
        try:
            return dict(zip(jpegs, decode_jpeg(_tensors([flat[i][1] for i in jpegs]), mode=ImageReadMode.RGB, device=self.device)))
        except (RuntimeError, ValueError):
            return {}  # a bad image in the batch: decode one by one to blame the right request

    def _pixels(self, images: list[torch.Tensor]) -> torch.Tensor:
        """CHW images -> (N, crop, crop, 3) uint8, one resize per distinct image size."""
        out = torch.empty((len(images), self.spec.crop, self.spec.crop, 3), dtype=torch.uint8, device=self.device)
        by_size: dict[tuple[int, ...], list[int]] = {}
        for i, img in enumerate(images):
            by_size.setdefault(tuple(img.shape), []).append(i)
        for indices in by_size.values():
            out[indices] = eval_pixels(torch.stack([images[i] for i in indices]), self.spec).permute(0, 2, 3, 1)
        return out

    def decode(self, requests: list) -> Decoded:
        """Per request its image count or the ValueError that fails it alone, and the pixels of the
        requests that decoded, in order, stacked on the device (None when none did)."""
        flat = _flatten(requests)
        decoded = self._decoded(flat)
        per_request: list[list[torch.Tensor] | ValueError] = [[] for _ in requests]
        for i, (r, data) in enumerate(flat):
            images = per_request[r]
            if isinstance(images, ValueError):
                continue
            try:
                images.append(decoded[i] if i in decoded else self._decode_one(data))
            except ValueError as exc:
                per_request[r] = exc
        good = [img for images in per_request if not isinstance(images, ValueError) for img in images]
        counts = [images if isinstance(images, ValueError) else len(images) for images in per_request]
        return (self._pixels(good) if good else None), counts

    def batch(self, requests: list) -> list[np.ndarray | ValueError]:
        """Per request: its pixels on the host, or the ValueError that fails that request alone."""
        pixels, counts = self.decode(requests)
        return per_request(pixels.cpu().numpy() if pixels is not None else None, counts)
