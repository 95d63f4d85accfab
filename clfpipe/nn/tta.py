"""The TTA views of ``contract.tta`` as tensor operations that export to ONNX: training-side
evaluation, a graph with TTA folded in, and Triton compute the same thing."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch.nn import functional as F

from clfpipe.contract.probabilities import NONE, SIGMOID, SOFTMAX
from clfpipe.contract.tta import DETERMINISTIC_VIEWS, View

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    SOFTMAX: lambda x: torch.softmax(x, dim=-1), SIGMOID: torch.sigmoid, NONE: lambda x: x,
}


def apply_view(view: View, x: torch.Tensor) -> torch.Tensor:
    """One view of (N, 3, S, S) model inputs."""
    if view.zoom < 1.0:
        size = x.shape[-1]
        crop = round(size * view.zoom)
        start = (size - crop) // 2
        x = x[..., start : start + crop, start : start + crop]
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    if view.flip:
        x = torch.flip(x, dims=[-1])
    return x


def view_outputs(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                 views: Sequence[View] = DETERMINISTIC_VIEWS) -> torch.Tensor:
    """(views, N, outputs): forward(view(x)) for each view, in one forward pass for all views."""
    return forward(torch.cat([apply_view(view, x) for view in views])).reshape(len(views), x.shape[0], -1)


def average_probs(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, activation: str,
                  views: Sequence[View] = DETERMINISTIC_VIEWS) -> torch.Tensor:
    """Mean over views of activation(forward(view(x))); one forward pass for all views."""
    return ACTIVATIONS[activation](view_outputs(forward, x, views)).mean(0)
