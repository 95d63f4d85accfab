"""Architectures as a table (after fastai's ``model_meta``): where the torchvision classifier is
cut into a body and how the body splits into layer groups.

Every entry is a torchvision ResNet-family classifier (stem, layer1..layer4, avgpool, fc): the body
is its children up to ``cut`` (avgpool and fc dropped); ``body[:split]`` (stem..layer2) is the
first layer group, ``body[split:]`` (layer3..layer4) the second, the new head the third, so
differential learning rates are one value per group.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ArchMeta:
    features: int  # channels the body outputs (the concat-pool head doubles them)
    cut: int = -2  # body = children()[:cut]
    split: int = 6  # body[:split] | body[split:]


ARCHS: dict[str, ArchMeta] = {
    "resnet18": ArchMeta(512),
    "resnet34": ArchMeta(512),
    "resnet50": ArchMeta(2048),
    "resnet101": ArchMeta(2048),
    "resnet152": ArchMeta(2048),
    "resnext50_32x4d": ArchMeta(2048),
    "resnext101_32x8d": ArchMeta(2048),
    "resnext101_64x4d": ArchMeta(2048),
    "wide_resnet50_2": ArchMeta(2048),
    "wide_resnet101_2": ArchMeta(2048),
}


# The layer groups every arch splits into, in order; differential lrs give one value per group.
LAYER_GROUPS = ("body_early", "body_late", "head")


def arch_names() -> list[str]:
    return sorted(ARCHS)
