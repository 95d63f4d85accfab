"""Test-time augmentation views as data: the one definition that training-side evaluation, an
export with TTA folded into the graph, and Triton all apply (``clfpipe.nn.tta`` runs them on
tensors). Probabilities, not logits, are averaged over the views, as fastai does.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class View:
    name: str
    flip: bool = False  # horizontal flip
    zoom: float = 1.0  # centre crop of zoom x S, resized back to S


DETERMINISTIC_VIEWS: tuple[View, ...] = (
    View("identity"),
    View("hflip", flip=True),
    View("zoom", zoom=0.875),
    View("zoom_hflip", flip=True, zoom=0.875),
)
