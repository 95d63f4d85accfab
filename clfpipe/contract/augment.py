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
from typing import Callable, Sequence


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


Draws = Callable[[int], Sequence[float]]  # draws(n): n values from [0, 1) of a seeded generator

# One image's draw is DRAWS values from [0, 1), one per column, whatever the policy uses: a batch's
# draws are then one (n, DRAWS) call of its generator, where drawing value by value (ten tiny
# generator calls an image) took 4.9 ms of host time per 256 images; drawn row by row or as one
# table, a generator gives the same values.
_COLUMNS = ("zoom", "u", "v", "turn", "angle", "brightness", "contrast", "hflip", "vflip", "rot90")
DRAWS = len(_COLUMNS)


def _lerp(lo: float, hi: float, t: float) -> float:
    return lo + (hi - lo) * t


def from_unit(policy: AugmentPolicy, unit: Sequence[float]) -> AugmentParams:
    """One image's parameters from its DRAWS values in [0, 1) (``_COLUMNS``' order)."""
    if len(unit) != DRAWS:
        raise ValueError(f"expected {DRAWS} values from [0, 1), got {len(unit)}")
    if not policy.random:
        return AugmentParams()
    zoom, u, v, turn, angle, brightness, contrast, hflip, vflip, rot90 = unit
    return AugmentParams(
        zoom=_lerp(1.0, policy.max_zoom, zoom),
        u=u,
        v=v,
        angle=_lerp(-policy.rotate_degrees, policy.rotate_degrees, angle) if turn < policy.rotate_p else 0.0,
        brightness=_lerp(1.0 - policy.brightness, 1.0 + policy.brightness, brightness),
        contrast=_lerp(1.0 - policy.contrast, 1.0 + policy.contrast, contrast),
        hflip=policy.hflip and hflip < 0.5,
        vflip=policy.dihedral and vflip < 0.5,
        rot90=policy.dihedral and rot90 < 0.5,
    )


def sample(policy: AugmentPolicy, draws: Draws) -> AugmentParams:
    """Draw one image's parameters from ``draws`` (a seeded generator's); none for no augmentation."""
    return from_unit(policy, draws(DRAWS)) if policy.random else AugmentParams()


def scaled_crop(height: int, width: int, params: AugmentParams, *, resize: int, crop: int) -> tuple[int, int, int, int]:
    """(new_height, new_width, top, left): the image scaled so its shorter side is resize x zoom
    (never below the crop), then the crop x crop window at (u, v) of the free space. At zoom 1 and
    the centre this is the evaluation pixels' resize and crop exactly. Scaling before cropping keeps
    small images at the evaluation scale: a window counted in source pixels of an 8x8 digit is 7 or
    8 pixels wide, so every zoom above 1 gave 7, and training never saw evaluation's scale."""
    scale = resize * params.zoom / min(height, width)
    new_h, new_w = max(crop, round(height * scale)), max(crop, round(width * scale))
    return new_h, new_w, int(params.u * (new_h - crop)), int(params.v * (new_w - crop))
