"""The served preprocessing step on a GPU: every JPEG of a dynamic batch decoded by nvJPEG in one
call, resized and cropped there (``clfpipe.nn.transforms.eval_pixels``), returned as uint8
(crop, crop, 3) like ``contract.preprocess.Preprocessor``.

Decoder and resampler differ from Pillow's, so pixels differ by a few levels from the Pillow path
that training evaluation uses; ``serve.decode = "pil"`` keeps them identical.
"""

from __future__ import annotations

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_image, decode_jpeg

from clfpipe.contract.preprocess import PreprocessSpec, open_checked
from clfpipe.nn.transforms import eval_pixels, is_jpeg


def _passes(data: bytes) -> bool:
    try:
        open_checked(data).close()
    except ValueError:
        return False  # decoded one by one below, where the error reaches its request
    return True


class DevicePreprocessor:
    def __init__(self, spec: PreprocessSpec, device: str = "cuda") -> None:
        self.spec, self.device = spec, torch.device(device)

    def _pixels(self, img: torch.Tensor) -> np.ndarray:
        return eval_pixels(img, self.spec).permute(1, 2, 0).cpu().numpy()

    def _decode_one(self, data: bytes) -> np.ndarray:
        open_checked(data).close()  # the formats and size bounds of the Pillow path, from the header
        try:
            tensor = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            img = decode_jpeg(tensor, mode=ImageReadMode.RGB, device=self.device) if is_jpeg(data) else \
                decode_image(tensor, mode=ImageReadMode.RGB).to(self.device)
        except RuntimeError as exc:
            raise ValueError(f"not a decodable image: {str(exc).splitlines()[0]}") from exc
        return self._pixels(img)

    def batch(self, requests: list) -> list[np.ndarray | ValueError]:
        """Per request: its pixels, or the ValueError that fails that request alone."""
        flat = [(r, bytes(d)) for r, images in enumerate(requests) for d in np.asarray(images, dtype=object).reshape(-1)]
        jpegs = [i for i, (_, d) in enumerate(flat) if is_jpeg(d) and _passes(d)]
        decoded: dict[int, np.ndarray] = {}
        try:  # the common case: one nvJPEG call for the whole dynamic batch
            tensors = [torch.frombuffer(bytearray(flat[i][1]), dtype=torch.uint8) for i in jpegs]
            for i, img in zip(jpegs, decode_jpeg(tensors, mode=ImageReadMode.RGB, device=self.device) if jpegs else []):
                decoded[i] = self._pixels(img)
        except (RuntimeError, ValueError):
            decoded = {}  # a bad image in the batch: decode one by one to blame the right request
        results: list[list[np.ndarray] | ValueError] = [[] for _ in requests]
        for i, (r, data) in enumerate(flat):
            if isinstance(results[r], ValueError):
                continue
            try:
                results[r].append(decoded[i] if i in decoded else self._decode_one(data))  # type: ignore[union-attr]
            except ValueError as exc:
                results[r] = exc
        return [r if isinstance(r, ValueError) else np.stack(r) for r in results]
