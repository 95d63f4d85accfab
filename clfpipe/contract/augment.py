"""Training augmentation policies as data (fastai 0.7's transforms), one definition for every path.

``side_on``: random zoom (shorter side up to max_zoom x the spec's resize, then a random crop),
rotation of +-10 degrees with p=0.75, brightness and contrast +-5%, horizontal flip.
``top_down`` (satellite images): the same plus vertical flip and 90-degree rotation, the eight
symmetries of a square. ``none``: the evaluation pixels (resize, centre crop).

``sample`` draws one image's parameters from a policy; the PIL path (loader workers) and the
tensor path (decoded on the training device) both apply what it draws, so they agree by
construction on the distribution and differ only by their resamplers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class AugmentPolicy:
    max_zoom: float = 1.0
    rotate_degrees: float = 0.0
    rotate_p: float = 0.0
    brightness: float = 0.0  # factor drawn from 1 +- brightness
    contrast: float = 0.0
    hflip: bool = False
    dihedral: bool = False  # also vertical flips and 90-degree turns

    @property
    def random(self) -> bool:
        return self != AugmentPolicy()


_LIGHTING = dict(max_zoom=1.1, rotate_degrees=10.0, rotate_p=0.75, brightness=0.05, contrast=0.05, hflip=True)
AUGMENTS: dict[str, AugmentPolicy] = {
    "none": AugmentPolicy(),
    "side_on": AugmentPolicy(**_LIGHTING),
    "top_down": AugmentPolicy(**_LIGHTING, dihedral=True),
}


@dataclass(frozen=True)
class AugmentParams:
    """One image's draw. The crop window is placed at fractions (u, v) of the free space."""

    zoom: float = 1.0
    u: float = 0.5  # vertical position of the crop window, 0 = top
    v: float = 0.5  # horizontal position, 0 = left
    angle: float = 0.0
    brightness: float = 1.0
    contrast: float = 1.0
    hflip: bool = False
    vflip: bool = False
    rot90: bool = False


Uniform = Callable[[float, float], float]  # uniform(a, b): a draw from [a, b)


def sample(policy: AugmentPolicy, uniform: Uniform) -> AugmentParams:
    """Draw one image's parameters, in a fixed order, from ``uniform`` (a seeded generator's)."""
    u01 = uniform
    if not policy.random:
        return AugmentParams()
    zoom = u01(1.0, policy.max_zoom)
    u, v = u01(0.0, 1.0), u01(0.0, 1.0)
    angle = u01(-policy.rotate_degrees, policy.rotate_degrees) if u01(0.0, 1.0) < policy.rotate_p else 0.0
    brightness = u01(1.0 - policy.brightness, 1.0 + policy.brightness)
    contrast = u01(1.0 - policy.contrast, 1.0 + policy.contrast)
    hflip = policy.hflip and u01(0.0, 1.0) < 0.5
    vflip = policy.dihedral and u01(0.0, 1.0) < 0.5
    rot90 = policy.dihedral and u01(0.0, 1.0) < 0.5
    return AugmentParams(zoom, u, v, angle, brightness, contrast, hflip, vflip, rot90)


def scaled_crop(height: int, width: int, params: AugmentParams, *, resize: int, crop: int) -> tuple[int, int, int, int]:
    """(new_height, new_width, top, left): the image scaled so its shorter side is resize x zoom
    (never below the crop), then the crop x crop window at (u, v) of the free space. At zoom 1 and
    the centre this is the evaluation pixels' resize and crop exactly. Scaling before cropping keeps
    small images at the evaluation scale: a window counted in source pixels of an 8x8 digit is 7 or
    8 pixels wide, so every zoom above 1 gave 7, and training never saw evaluation's scale."""
    scale = resize * params.zoom / min(height, width)
    new_h, new_w = max(crop, round(height * scale)), max(crop, round(width * scale))
    return new_h, new_w, int(params.u * (new_h - crop)), int(params.v * (new_w - crop))
