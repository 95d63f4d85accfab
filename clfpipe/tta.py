"""Test-time augmentation: the one definition of the deterministic views.

Views act on the model's input tensor (N, 3, S, S) after the preprocessing spec, with torch ops
that export to ONNX, so training-side evaluation, an export that folds TTA into the graph and
Triton compute the same thing. Probabilities (not logits) are averaged, as fastai does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch.nn import functional as F


@dataclass(frozen=True)
class View:
    name: str
    flip: bool = False  # horizontal flip
    zoom: float = 1.0  # centre crop of zoom x S, resized back to S

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.zoom < 1.0:
            size = x.shape[-1]
            crop = round(size * self.zoom)
            start = (size - crop) // 2
            x = x[..., start : start + crop, start : start + crop]
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        if self.flip:
            x = torch.flip(x, dims=[-1])
        return x


DETERMINISTIC_VIEWS: tuple[View, ...] = (
    View("identity"),
    View("hflip", flip=True),
    View("zoom", zoom=0.875),
    View("zoom_hflip", flip=True, zoom=0.875),
)


def average_probs(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                  views: Sequence[View] = DETERMINISTIC_VIEWS, multi_label: bool = False) -> torch.Tensor:
    """Mean over views of softmax (sigmoid for multi-label) of forward(view(x)); one forward for all views."""
    n = x.shape[0]
    logits = forward(torch.cat([view(x) for view in views]))
    probs = torch.sigmoid(logits) if multi_label else torch.softmax(logits, dim=-1)
    return probs.reshape(len(views), n, -1).mean(0)
